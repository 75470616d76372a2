"""The examples database: SQLite with the columns of a published `-examples` dataset.

`write_db` writes one, `import_dataset` fills one from published rows, and `Examples`
opens one (importing published rows into the cache first where needed). Databases are
written beside their destination and moved into place once complete (see
`mlsae.files.atomic_output`); a full disk fails with one message naming the folder.

Each database records its origin (`mlsae.analysis.identity`): the model that wrote it,
or the dataset it was imported from, in a one-row table `model`. `Examples` given a
model refuses a database of another model. Its rows are `Example`s
(`mlsae.analysis.examples_schema`, re-exported here).
"""

import errno
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from mlsae.analysis.examples_schema import COLUMNS, FEATURES, Example
from mlsae.analysis.identity import OutputOrigin, check_origin, resolve_identity
from mlsae.files import atomic_output
from mlsae.lm.documents import load_local_dataset
from mlsae.names import cache_path, derived_name

__all__ = [
    "COLUMNS",
    "FEATURES",
    "Example",
    "Examples",
    "create_db",
    "import_dataset",
    "insert_examples",
    "read_origin",
    "write_db",
    "write_origin",
]

_INSERT_CHUNK_ROWS = 10_000
_EXPORT_CHUNK_ROWS = 100_000
_DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def create_db(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (or create) an examples database with its table and index."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    connection.execute(
        """
        CREATE TABLE IF NOT EXISTS examples (
            id INTEGER PRIMARY KEY,
            latent INTEGER,
            layer INTEGER,
            token_id INTEGER,
            token TEXT,
            act REAL,
            token_ids JSON,
            tokens JSON,
            acts JSON
        )
        """
    )
    connection.execute(
        "CREATE INDEX IF NOT EXISTS examples_latent_layer ON examples (latent, layer)"
    )
    connection.commit()
    return connection


def insert_examples(
    connection: sqlite3.Connection,
    examples: Iterable[Example],
    inserted: Callable[[int], object] | None = None,
) -> int:
    """Insert examples (new ids); returns how many. `inserted` is called with the number
    of rows of each chunk once it is inserted (a progress bar's `update`)."""
    n_rows = 0
    for chunk in _chunks((example.serialize() for example in examples), _INSERT_CHUNK_ROWS):
        connection.executemany(
            "INSERT INTO examples (latent, layer, token_id, token, act, token_ids, tokens, acts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            chunk,
        )
        n_rows += len(chunk)
        if inserted is not None:
            inserted(len(chunk))
    connection.commit()
    return n_rows


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rows_bar(description: str, total: int | None, show: bool = True) -> tqdm:
    """A progress bar over the rows of a database (none unless `show`)."""
    return tqdm(total=total, desc=description, unit="row", disable=not show)


def _is_sqlite_full(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
        "database or disk is full" in str(error)
    )


@contextmanager
def _new_database(path: Path) -> Iterator[sqlite3.Connection]:
    """A new examples database, written beside `path` and moved onto it once complete.

    On any failure nothing is left behind (SQLite's journal included); a full disk, which
    SQLite reports as its own error, fails as one (`mlsae.files.DiskFullError`).
    """
    path.with_name(path.name + ".partial").unlink(missing_ok=True)  # older versions' partial
    with atomic_output(path, f"the examples database {path.name}") as partial:
        try:
            connection = create_db(partial)
            try:
                yield connection
                connection.commit()
            finally:
                connection.close()
        except sqlite3.Error as error:
            if _is_sqlite_full(error):
                raise OSError(errno.ENOSPC, f"{error} ({partial})") from error
            raise
        finally:
            Path(f"{partial}-journal").unlink(missing_ok=True)


def write_origin(connection: sqlite3.Connection, origin: OutputOrigin) -> None:
    """Record what wrote the database, in its one-row table `model`."""
    connection.execute("CREATE TABLE model (identity TEXT, repo_id TEXT, imported_from TEXT)")
    connection.execute(
        "INSERT INTO model VALUES (?, ?, ?)", (origin.model, origin.repo_id, origin.imported_from)
    )


def read_origin(path: str | os.PathLike[str]) -> OutputOrigin | None:
    """What wrote the database at `path`; None when it does not say (an older one)."""
    if not Path(path).is_file():
        return None
    connection = sqlite3.connect(path)
    try:
        row = connection.execute("SELECT identity, repo_id, imported_from FROM model").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        connection.close()
    return None if row is None else OutputOrigin(*row)


def write_db(
    examples: Iterable[Example],
    path: str | os.PathLike[str],
    n_layers: int | None = None,
    n_latents: int | None = None,
    origin: OutputOrigin | None = None,
    *,
    progress: bool = False,
    total: int | None = None,
) -> Path:
    """Replace the database at `path` with `examples` (written aside, then moved).

    With `n_layers` and `n_latents`, the database also records the model's shape, so
    that `Examples.get` can reject a layer or latent out of range; with `origin`, what
    wrote it, so that `Examples` can refuse it to another model. With `progress`, a
    progress bar counts the rows written (out of `total`, when given).
    """
    path = Path(path)
    with _new_database(path) as connection:
        with _rows_bar("writing examples", total, progress) as bar:
            insert_examples(connection, examples, inserted=bar.update)
        if n_layers is not None and n_latents is not None:
            connection.execute("CREATE TABLE shape (n_layers INTEGER, n_latents INTEGER)")
            connection.execute("INSERT INTO shape VALUES (?, ?)", (n_layers, n_latents))
        if origin is not None:
            write_origin(connection, origin)
    return path


def import_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict,
    path: str | os.PathLike[str],
    imported_from: str | None = None,
) -> Path:
    """Replace the database at `path` with the rows of an `-examples` dataset, ids kept
    when it has them; with `imported_from` (the dataset's hub id or local path), the
    database records it as its origin."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    path = Path(path)
    has_ids = "id" in dataset.column_names
    columns = list(COLUMNS if has_ids else COLUMNS[1:])
    placeholders = ", ".join("?" * len(columns))
    statement = f"INSERT INTO examples ({', '.join(columns)}) VALUES ({placeholders})"
    with _new_database(path) as connection:
        progress = _rows_bar("importing examples", len(dataset))
        for rows in dataset.select_columns(columns).iter(batch_size=_INSERT_CHUNK_ROWS):
            for name in ("token_ids", "tokens", "acts"):
                rows[name] = [
                    value if isinstance(value, str) else json.dumps(list(value))
                    for value in rows[name]
                ]
            connection.executemany(statement, zip(*(rows[name] for name in columns), strict=True))
            progress.update(len(rows["latent"]))
        progress.close()
        if imported_from is not None:
            write_origin(connection, OutputOrigin(imported_from=imported_from))
    return path


def _load_rows(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """The rows of a local `-examples` dataset: a file, a `save_to_disk` folder, or a
    folder of data files."""
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(path))
        return load_local_dataset(str(path), split="train")
    name = path.name.removesuffix(".zst").removesuffix(".gz")
    builder = _DATA_EXTENSIONS.get(Path(name).suffix)
    if builder is None:
        raise ValueError(f"cannot read examples from {path}: expected .db, .jsonl or .parquet")
    return load_local_dataset(builder, data_files=str(path), split="train")


class Examples:
    """The examples of a model, from SQLite.

    `Examples(source)` opens, in turn: `source` as a `.db` file; `source` as local rows
    of an `-examples` dataset (a file or folder, imported into `<output_dir>/<its
    name>.db` unless that exists); the cache `<output_dir>/<owner>-<name>-examples.db`
    of the model `source` (hub id or local model folder); or the hub dataset
    `<owner>/<name>-examples`, imported into that cache.

    Given `model` (an `MLSAETransformer`, or its `model_identity`), it refuses a
    database that another model wrote, or (for the cache) that was imported from another
    model's dataset, with an `OutputOfAnotherModelError` (see
    `mlsae.analysis.identity.check_origin`).
    """

    def __init__(
        self, source: str | os.PathLike[str], output_dir: str = "out", model: Any = None
    ) -> None:
        path = Path(source)
        dataset_id = None
        if path.suffix == ".db":
            if not path.is_file():
                raise FileNotFoundError(f"no examples database at {path}")
            self.path = path
        elif path.exists() and not (path / "config.json").exists():
            self.path = Path(output_dir) / f"{path.name.split('.')[0]}.db"
            if not self.path.exists():
                import_dataset(_load_rows(path), self.path, imported_from=str(path))
        else:
            dataset_id = derived_name(str(source), "examples")
            self.path = cache_path(str(source), "examples", "db", output_dir)
            if not self.path.exists():
                dataset = datasets.load_dataset(dataset_id, split="train")
                import_dataset(dataset, self.path, imported_from=dataset_id)
        if model is not None:
            rerun = "run `python -m mlsae.analysis.examples` for this model"
            if dataset_id is not None:
                rerun = f"run `python -m mlsae.analysis.examples --repo_id {source}`"
            check_origin(
                self.path,
                read_origin(self.path),
                resolve_identity(model),
                dataset_id=dataset_id,
                rerun=rerun,
            )
        self.connection = sqlite3.connect(self.path)

    def origin(self) -> OutputOrigin | None:
        """What wrote the database; None when it does not say (an older one)."""
        return read_origin(self.path)

    def shape(self) -> tuple[int, int] | None:
        """`(n_layers, n_latents)` of the model, when the database records them."""
        try:
            row = self.connection.execute("SELECT n_layers, n_latents FROM shape").fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else (int(row[0]), int(row[1]))

    def get(self, layer: int, latent: int) -> list[Example]:
        """The examples of `latent` at `layer`, by act descending.

        A layer (a position in the model's stack of layers) or latent out of range
        raises a ValueError.
        """
        shape = self.shape()
        for name, value, size in (
            ("layer", layer, shape[0] if shape else None),
            ("latent", latent, shape[1] if shape else None),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            if size is not None and value >= size:
                raise ValueError(f"{name} {value} is out of range: the model has {size}")
        cursor = self.connection.execute(
            "SELECT latent, layer, token_id, token, act, token_ids, tokens, acts "
            "FROM examples WHERE latent = ? AND layer = ? ORDER BY act DESC, id",
            (latent, layer),
        )
        return [Example.from_row(row) for row in cursor.fetchall()]

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM examples").fetchone()[0]

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row, with the published columns, in id order."""
        cursor = self.connection.execute(f"SELECT {', '.join(COLUMNS)} FROM examples ORDER BY id")
        for row in cursor:
            yield dict(zip(COLUMNS, row, strict=True))

    def to_dataset(self) -> datasets.Dataset:
        """The rows as an `-examples` dataset, built a chunk of rows at a time under a
        progress bar."""
        cursor = self.connection.execute(f"SELECT {', '.join(COLUMNS)} FROM examples ORDER BY id")
        parts = []
        with _rows_bar("exporting examples", len(self)) as bar:
            while rows := cursor.fetchmany(_EXPORT_CHUNK_ROWS):
                columns = dict(zip(COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
                parts.append(datasets.Dataset.from_dict(columns, features=FEATURES))
                bar.update(len(rows))
        if not parts:
            return datasets.Dataset.from_dict({name: [] for name in COLUMNS}, features=FEATURES)
        return datasets.concatenate_datasets(parts)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> None:
        """Push the rows to the hub as the dataset `repo_id` (e.g. `...-examples`)."""
        self.to_dataset().push_to_hub(repo_id, **kwargs)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Examples":
        return self

    def __exit__(self, *args: object) -> None:
        self.close()
