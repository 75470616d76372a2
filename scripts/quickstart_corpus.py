"""The quick start's corpus: the docstrings of the standard library, split by their hash.

`collect_docstrings` reads a fixed list of stdlib modules, their submodules, public classes
and functions and the public members of those classes, in sorted order; `split_of` puts
each document in train, validation or test (90 / 5 / 5); `write_jsonl_zst` writes a split
as the Pile's files are (one `{"text": ..., "meta": {}}` per line).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import pkgutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import zstandard

MODULES = (
    "abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 cProfile "
    "calendar cmath cmd code codecs codeop collections colorsys compileall concurrent "
    "configparser contextlib contextvars copy copyreg csv ctypes curses dataclasses datetime "
    "dbm decimal difflib dis doctest email encodings enum errno faulthandler fcntl filecmp "
    "fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib "
    "grp gzip hashlib heapq hmac html http imaplib importlib inspect io ipaddress itertools "
    "json keyword linecache locale logging lzma mailbox marshal math mimetypes mmap "
    "modulefinder multiprocessing netrc numbers opcode operator optparse os pathlib pdb "
    "pickle pickletools pkgutil platform plistlib poplib posix posixpath pprint profile "
    "pstats pty pwd py_compile pyclbr pydoc queue quopri random re reprlib resource "
    "rlcompleter runpy sched secrets select selectors shelve shlex shutil signal site "
    "smtplib socket socketserver sqlite3 ssl stat statistics string stringprep struct "
    "subprocess symtable sys sysconfig syslog tabnanny tarfile tempfile termios textwrap "
    "threading time timeit token tokenize tomllib trace traceback tracemalloc tty types "
    "typing unicodedata unittest urllib uuid warnings wave weakref webbrowser wsgiref xml "
    "xmlrpc zipapp zipfile zipimport zlib zoneinfo"
).split()

SKIPPED_PARTS = {"test", "tests", "idle_test", "__main__"}


def import_quietly(name: str) -> ModuleType | None:
    """Import a module with its output and warnings discarded; None if it fails."""
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:
        return None


def module_names() -> Iterator[str]:
    """The modules of `MODULES` and, for packages, their public submodules, in order."""
    for name in MODULES:
        module = import_quietly(name)
        if module is None:
            continue
        yield name
        if not hasattr(module, "__path__"):
            continue
        submodules = pkgutil.walk_packages(module.__path__, f"{name}.", onerror=lambda _: None)
        for info in sorted(submodules, key=lambda info: info.name):
            parts = info.name.split(".")
            if not any(part.startswith("_") or part in SKIPPED_PARTS for part in parts):
                yield info.name


def documented_objects(module: ModuleType) -> Iterator[object]:
    """The module, its public classes and routines, and their public members, in order."""
    yield module
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        try:
            value = getattr(module, name)
        except Exception:
            continue
        if inspect.isclass(value):
            yield value
            yield from class_members(value)
        elif inspect.isroutine(value):
            yield value


def class_members(cls: type, depth: int = 0) -> Iterator[object]:
    """The public methods, properties and nested classes that `cls` itself defines."""
    members = vars(cls)
    for name in sorted(members):
        if name.startswith("_"):
            continue
        value = members[name]
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isclass(value):
            if depth < 1 and value.__qualname__.startswith(f"{cls.__qualname__}."):
                yield value
                yield from class_members(value, depth + 1)
        elif inspect.isroutine(value) or inspect.isdatadescriptor(value):
            yield value


def collect_docstrings(min_chars: int, max_documents: int | None = None) -> list[str]:
    """The distinct ASCII docstrings of the standard library, in a fixed order."""
    documents: dict[str, None] = {}
    for name in module_names():
        module = import_quietly(name)
        if module is None:
            continue
        for value in documented_objects(module):
            try:
                text = inspect.getdoc(value)
            except Exception:
                continue
            if not isinstance(text, str):
                continue
            text = text.strip()
            # Reprs of default values can hold memory addresses, which change every run.
            if len(text) < min_chars or not text.isascii() or " at 0x" in text:
                continue
            documents[text] = None
            if max_documents is not None and len(documents) >= max_documents:
                return list(documents)
    return list(documents)


def split_of(text: str) -> str:
    """The split of a document: train, validation or test, 90 / 5 / 5 by its hash."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    if bucket < 90:
        return "train"
    return "validation" if bucket < 95 else "test"


def write_jsonl_zst(path: Path, documents: list[str]) -> None:
    lines = "".join(json.dumps({"text": text, "meta": {}}) + "\n" for text in documents)
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(lines.encode()))
