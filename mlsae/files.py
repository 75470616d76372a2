"""Files as faults and attackers leave them: outputs never half-written, pickles read as
data.

Every file or folder the library writes for later runs to read (checkpoints, saved models,
analysis outputs) goes to a hidden `.<name>.partial` beside its destination and is renamed
into place only once complete. A failure removes the partial; a killed process leaves one
behind, which the next write to that destination (or `remove_partials` at the start of a run)
removes. A full disk becomes a `DiskFullError` that names the folder.

`torch.load` with `weights_only=False` unpickles arbitrary objects, so a crafted `.ckpt`,
`.bin` or `.pt` would run code when loaded. Every such file this library reads goes
through `load_as_data`, which allows tensors, plain containers and numbers (and the one
Lightning type a checkpoint of this library may hold); a file that needs more is refused.
"""

import errno
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full."""

    def __init__(self, folder: str | os.PathLike[str], what: str) -> None:
        super().__init__(
            errno.ENOSPC,
            f"no space left on the disk of {folder} while writing {what}: free some space "
            "(or write elsewhere) and run the command again",
        )
        self.folder = Path(folder)

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk or quota."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike[str], what: str | None = None) -> Iterator[Path]:
    """Yield the partial path to write `path` at (a file or a folder); on success rename it
    into place, replacing what was there; on any failure remove it.

    A full disk is re-raised as `DiskFullError` naming the folder of `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    _remove(partial)
    try:
        yield partial
        if partial.is_dir() and path.is_dir() and not path.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(partial, path)
            _remove(old)
        else:
            os.replace(partial, path)
    except BaseException as error:
        _remove(partial)
        if isinstance(error, Exception) and is_disk_full(error):
            raise DiskFullError(path.parent, what or path.name) from error
        raise


def remove_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the partial outputs a killed process left in `folder`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f".*{PARTIAL_SUFFIX}"))
    for path in stale:
        logger.info("removing %s, left by an interrupted write", path)
        _remove(path)
    return stale


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read, or does not match its module."""


_REFUSED_MARK = "Weights only load failed"


def _safe_globals() -> list[Any]:
    """The non-builtin types that checkpoints of this library may hold."""
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return []
    # Lightning may store the module's hyperparameters as an AttributeDict (a plain dict).
    return [AttributeDict]


def _first_line_with(text: str, word: str) -> str:
    """The first sentence of the first line of `text` that contains `word`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((line for line in lines if word in line.lower()), lines[0] if lines else "")
    return line.split(". ")[0].rstrip(".")


def load_as_data(
    path: str | os.PathLike[str], map_location: Any = "cpu", what: str = "file"
) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, plain containers and numbers only.

    Raises FileNotFoundError when the file does not exist and CheckpointError (one line
    that names the file, as `what`) when it is truncated, corrupt, or needs other objects.
    """
    path = Path(path)
    named = f"{what} {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{named} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _REFUSED_MARK in str(error):
            found = _first_line_with(str(error), "global")
            raise CheckpointError(
                f"refusing to load {named}: it holds Python objects other than tensors and "
                f"plain data ({found}); such files are read as data, never run as code"
            ) from None
        raise CheckpointError(f"cannot read {named}: it is corrupt ({error})") from None
    except Exception as error:
        reason = _first_line_with(str(error), "") or type(error).__name__
        raise CheckpointError(
            f"cannot read {named}: it is corrupt or truncated ({reason})"
        ) from None
