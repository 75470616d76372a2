"""The documents of a text dataset, in order, a group at a time.

Text comes from a Hugging Face hub dataset (streamed) or from local `.jsonl`, `.json`,
`.jsonl.zst` (or `.gz`, `.bz2`, `.xz`), `.parquet` and `.txt` files, given as one file, a
directory, or a glob. A `.txt` file holds one document per line.

One file or a glob is read a file at a time, in order, so that a document without text
is named by its file and line (JSON Lines: lines holding only whitespace are no
documents) or by its position in the file (other formats). A directory of split files
and a hub dataset are read as one stream, and such a document is named by its position
in the split. Either way, the documents and their order are those `datasets` reads.
"""

import bz2
import glob
import gzip
import io
import logging
import lzma
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

import datasets

from mlsae.lm.hub_access import closest_path, looks_local, require_hub_dataset

logger = logging.getLogger(__name__)

GROUP_SIZE = 1024
"""The number of documents joined and tokenised together (the original's `map` batch)."""

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".zst", ".gz", ".bz2", ".xz")
_GLOB_CHARS = ("*", "?", "[")


class BadDocumentError(ValueError):
    """A document whose text is missing, null or not a string."""


class DocumentPart(NamedTuple):
    """A part of a dataset read as one stream: a local file, or a whole split."""

    label: str
    """How messages name it: the file, or the dataset and its split."""

    file: str | None
    """The local file, when the part is one."""

    load: Callable[[], datasets.IterableDataset]


class SkippedDocument(NamedTuple):
    """A document left out for having no text."""

    part: DocumentPart
    index: int
    """Its position in the part, from 0."""


def _is_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def _strip_compression(name: str) -> tuple[str, str | None]:
    name = name.lower()
    for compression in _COMPRESSIONS:
        if name.endswith(compression):
            return name[: -len(compression)], compression
    return name, None


def _builder_for(file: str) -> str | None:
    """The `datasets` builder that reads `file`, from its extension, or None."""
    return _BUILDERS.get(os.path.splitext(_strip_compression(file)[0])[1])


def _looks_local(path: str) -> bool:
    """Whether `path` names local files rather than a hub dataset id: a glob, a data file's
    extension, or what `mlsae.lm.hub_access.looks_local` says (a leading `.`, `~` or `/`,
    more than one `/`, a first component that is a local folder). Such a path that does not
    exist is reported as missing, never looked up on the hub."""
    return (
        _is_glob(path)
        or _builder_for(path) is not None
        or os.path.exists(path)
        or looks_local(path)
    )


def _builder_for_files(files: list[str], path: str) -> str:
    builders = {_builder_for(file) for file in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"{path!r} matches files of unsupported or mixed types ({sorted(files)[:5]}); "
            f"expected all of one of: {', '.join(_BUILDERS)} (optionally compressed with "
            f"{', '.join(_COMPRESSIONS)})"
        )
    return builders.pop()  # type: ignore[return-value]


def _local_files(path: str) -> list[str]:
    """The files that a local file or glob names, in order."""
    if _is_glob(path):
        files = sorted(file for file in glob.glob(path, recursive=True) if os.path.isfile(file))
        if not files:
            raise FileNotFoundError(f"no files match {path!r}")
        return files
    if os.path.isfile(path):
        return [path]
    guess = closest_path(path)
    raise FileNotFoundError(
        f"no such file or directory: {path!r}"
        + (f" (did you mean {guess!r}?)" if guess is not None else "")
    )


def load_local_dataset(path: str, **options: Any) -> Any:
    """`datasets.load_dataset` of local files (`path` a folder or a builder such as "json"),
    which never reaches the network: datasets otherwise sends a download count for the
    builder to its servers on every load."""
    counting = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(path, **options)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting


def _load_files(files: list[str], builder: str, label: str) -> datasets.IterableDataset:
    try:
        return load_local_dataset(builder, data_files=files, split="train", streaming=True)
    except StopIteration as error:
        raise ValueError(f"{label} holds no documents") from error
    except Exception as error:
        raise ValueError(f"could not read {label} as {builder}: {error!r}") from error


def _load_directory(path: str, split: str) -> datasets.IterableDataset:
    try:
        return load_local_dataset(path, split=split, streaming=True)
    except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError) as error:
        raise FileNotFoundError(f"no readable data files in {path!r}: {error}") from error
    except StopIteration as error:
        raise ValueError(f"{path!r} (split {split!r}) holds no documents") from error
    except Exception as error:
        raise ValueError(f"could not read {path!r} (split {split!r}): {error!r}") from error


def load_text_dataset(
    path: str, split: str = "train", name: str | None = None
) -> datasets.IterableDataset:
    """Stream the rows of a hub dataset or of local text files.

    Args:
        path: a hub dataset id (e.g. `monology/pile-uncopyrighted`), or a local file, a
            directory, or a glob of `.jsonl[.zst]`, `.json`, `.parquet` or `.txt` files.
        split: the split of a hub dataset or a directory (whose files `datasets` assigns
            to splits by name, e.g. `train.jsonl.zst`, `validation.jsonl.zst`). A file or
            a glob is one split, whatever is asked.
        name: the configuration (subset) of a hub dataset.
    """
    path = os.path.expanduser(path)
    if not _looks_local(path):
        require_hub_dataset(path)
        return datasets.load_dataset(path, name=name, split=split, streaming=True)
    if os.path.isdir(path):
        return _load_directory(path, split)
    files = _local_files(path)
    return _load_files(files, _builder_for_files(files, path), repr(path))


def document_parts(path: str, split: str = "train", name: str | None = None) -> list[DocumentPart]:
    """The parts of a dataset in reading order: each file of a local file or glob, else
    the whole split of a directory or hub dataset."""
    path = os.path.expanduser(path)
    if not _looks_local(path) or os.path.isdir(path):
        label = f"{path!r} (split {split!r})"
        return [DocumentPart(label, None, lambda: load_text_dataset(path, split, name))]
    files = _local_files(path)
    builder = _builder_for_files(files, path)

    def part(file: str) -> DocumentPart:
        return DocumentPart(repr(file), file, lambda: _load_files([file], builder, repr(file)))

    return [part(file) for file in files]


def _text_batches(part: DocumentPart, text_column: str, batch_size: int) -> Iterator[list]:
    """The values of `text_column` in `part`, `batch_size` rows at a time."""
    dataset = part.load()
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(_no_column_message(part, text_column, columns))
    if columns is not None and len(columns) > 1:
        dataset = dataset.select_columns([text_column])
    rows = iter(dataset.iter(batch_size=batch_size))
    while True:
        try:
            batch = next(rows)
        except StopIteration:
            return
        except Exception as error:
            raise ValueError(f"could not read {part.label}: {error!r}") from error
        if text_column not in batch:
            raise ValueError(_no_column_message(part, text_column, list(batch)))
        yield batch[text_column]


def _no_column_message(part: DocumentPart, text_column: str, columns: list[str]) -> str:
    return (
        f"{part.label} has no column {text_column!r}; its columns are {columns}: "
        "check --text_column"
    )


def _open_binary(file: str, compression: str | None) -> BinaryIO:
    if compression == ".zst":
        import zstandard

        # The zstandard reader reads blocks only; buffering gives it lines.
        return io.BufferedReader(zstandard.open(file, "rb"), 1 << 20)  # type: ignore[arg-type]
    opener = {None: open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[compression]
    return opener(file, "rb")


def _jsonl_line(file: str, index: int) -> int | None:
    """The line number (from 1) of document `index` (from 0) of a JSON Lines file, where
    lines holding only whitespace hold no document, as the json reader has it."""
    stem, compression = _strip_compression(file)
    if not stem.endswith(".jsonl"):
        return None
    try:
        with _open_binary(file, compression) as stream:
            documents = -1
            for number, line in enumerate(stream, 1):
                documents += bool(line.strip())
                if documents == index:
                    return number
    except OSError:
        return None
    return None


def describe_document(part: DocumentPart, index: int) -> str:
    """Where document `index` (from 0) of `part` is: its line in a JSON Lines file, else
    its position in the file or split, counting from 1."""
    line = None if part.file is None else _jsonl_line(part.file, index)
    if line is not None:
        return f"line {line} of {part.label}"
    return f"document {index + 1:,} (counting from 1) of {part.label}"


def _bad_document_message(part: DocumentPart, index: int, value: object, text_column: str) -> str:
    where = describe_document(part, index)
    if value is None:
        problem = f"{where} has no text in column {text_column!r} (missing or null)"
    else:
        problem = f"{where}: column {text_column!r} holds a {type(value).__name__}, not text"
    return f"{problem}: check --text_column, or pass --skip_bad_documents to skip such documents"


def _texts_of_part(
    part: DocumentPart,
    text_column: str,
    batch_size: int,
    on_skip: Callable[[SkippedDocument], None] | None,
) -> Iterator[list[str]]:
    """The texts of `part`; documents without text raise, or with `on_skip` are left out
    and passed to it."""
    index = 0
    for texts in _text_batches(part, text_column, batch_size):
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad and on_skip is None:
            raise BadDocumentError(
                _bad_document_message(part, index + bad[0], texts[bad[0]], text_column)
            )
        for i in bad:
            on_skip(SkippedDocument(part, index + i))  # type: ignore[misc]
        index += len(texts)
        yield [text for text in texts if isinstance(text, str)] if bad else texts


def iter_text_groups(
    path: str,
    split: str = "train",
    name: str | None = None,
    text_column: str = "text",
    group_size: int = GROUP_SIZE,
    on_skip: Callable[[SkippedDocument], None] | None = None,
) -> Iterator[list[str]]:
    """Yield the documents of a dataset in order, `group_size` at a time (the last fewer).

    A document whose text is missing, null or not a string raises a `BadDocumentError`
    naming its file and line (or position); with `on_skip`, it is left out instead (the
    groups are those of the dataset without it) and passed to `on_skip`.

    Raises ValueError when the files cannot be read, lack `text_column`, or hold no
    documents at all.
    """
    group: list[str] = []
    n_documents = 0
    for part in document_parts(path, split, name):
        for texts in _texts_of_part(part, text_column, group_size, on_skip):
            n_documents += len(texts)
            if not group and len(texts) == group_size:
                yield texts
                continue
            group.extend(texts)
            while len(group) >= group_size:
                yield group[:group_size]
                group = group[group_size:]
    if group:
        yield group
    if n_documents == 0:
        raise ValueError(f"{path!r} (split {split!r}) holds no documents with text")
