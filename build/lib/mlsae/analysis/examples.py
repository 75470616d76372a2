"""The top activating examples of every latent at every layer:
`python -m mlsae.analysis.examples`.

Streams text through a pretrained MLSAE and keeps, for every (layer, latent), the
`n_examples` token positions with the largest top-k values, each with a context window of
up to `n_tokens` tokens either side, clipped to its own sequence. Values are the pre-ReLU
top-k values rounded to float16, as published; only values above 1e-3 (after rounding)
count, and positions outside the mask (special tokens, unless `--count_special_tokens`)
never do. The best examples are kept on the device of the model while streaming, in
tensors of `n_layers * n_latents * n_examples` entries.

The examples are written to SQLite, `<output_dir>/<owner>-<name>-examples.db`, with the
columns of a published `-examples` dataset (`id, latent, layer, token_id, token, act,
token_ids, tokens, acts`; the last three are JSON strings of the context window). Read
them with `Examples(repo_id).get(layer, latent)`; `Examples` also imports published
`-examples` datasets (hub or local files) into that cache.

Unlike the original, windows never cross into the neighbouring sequence nor come out
empty near its start (it sliced the flattened batch), special tokens are left out by
default, and exactly `max_tokens // (batch_size * max_length)` batches are processed.
"""

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mlsae.analysis.config import AnalysisConfig, cache_path, derived_name, training_batches
from mlsae.analysis.source import LatentBatch, LatentSource
from mlsae.trainer.config import initialize, parse

COLUMNS = ("id", "latent", "layer", "token_id", "token", "act", "token_ids", "tokens", "acts")
"""The columns of a published `-examples` dataset and of the SQLite table."""

FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "latent": datasets.Value("int64"),
        "layer": datasets.Value("int64"),
        "token_id": datasets.Value("int64"),
        "token": datasets.Value("string"),
        "act": datasets.Value("float64"),
        "token_ids": datasets.Value("string"),
        "tokens": datasets.Value("string"),
        "acts": datasets.Value("string"),
    }
)

MIN_ACT = 1e-3
"""Values at or below this (compared in float16, as the original did) never count."""

_WINDOW_CHUNK_ELEMENTS = 1 << 24
_INSERT_CHUNK_ROWS = 10_000
_EXPORT_CHUNK_ROWS = 100_000
_DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class ExamplesConfig(AnalysisConfig):
    """Find the top activating examples of every latent of a pretrained MLSAE at every
    layer."""

    n_examples: int = 32
    """Examples kept per latent and layer."""

    n_tokens: int = 4
    """Context tokens either side of an example's token (clipped to its sequence)."""


class Example(NamedTuple):
    """One example: the token at which `latent` fired at `layer` and its context window."""

    latent: int
    layer: int
    token_id: int
    token: str
    act: float
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]

    def serialize(self) -> tuple[int | str | float, ...]:
        """The row without its id, with the window lists as JSON strings."""
        return (
            self.latent,
            self.layer,
            self.token_id,
            self.token,
            self.act,
            json.dumps(self.token_ids),
            json.dumps(self.tokens),
            json.dumps(self.acts),
        )

    @staticmethod
    def from_row(row: Sequence[Any]) -> "Example":
        """From a table row without its id."""
        latent, layer, token_id, token, act, token_ids, tokens, acts = row
        return Example(
            latent, layer, token_id, token, act, _json(token_ids), _json(tokens), _json(acts)
        )

    @staticmethod
    def from_dict(row: dict[str, Any]) -> "Example":
        """From a dataset row (window columns as JSON strings or as lists)."""
        return Example.from_row([row[name] for name in COLUMNS[1:]])


def _json(value: str | list) -> list:
    return json.loads(value) if isinstance(value, str) else list(value)


class TopExamples:
    """The best `n_examples` positions of every (layer, latent), updated batch by batch.

    Per (layer, latent) slot, in descending order of value (`-inf` marks an empty slot):
    `values` (float16 values held as float32), `token_ids` (the token), and the context
    window `window_token_ids` (-1 outside the sequence) and `window_acts` (the latent's
    value at each window position where it is in the top k there and the position counts,
    else 0). That is `8 + 6 * (2 * n_tokens + 1)` bytes per slot, on the device: about
    0.4 GB for Pythia-70m (6 layers) with 32,768 latents, 32 examples and 4 tokens either
    side.
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        n_examples: int,
        n_tokens: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_examples < 1 or n_tokens < 0:
            raise ValueError(
                f"need n_examples >= 1 and n_tokens >= 0, got {n_examples}, {n_tokens}"
            )
        self.n_layers = n_layers
        self.n_latents = n_latents
        self.n_examples = n_examples
        self.n_tokens = n_tokens
        self.window = 2 * n_tokens + 1
        groups = n_layers * n_latents
        self.values: Float[Tensor, "group example"] = torch.full(
            (groups, n_examples), -torch.inf, device=device
        )
        self.token_ids: Int[Tensor, "group example"] = torch.full(
            (groups, n_examples), -1, dtype=torch.int32, device=device
        )
        self.window_token_ids: Int[Tensor, "group example window"] = torch.full(
            (groups, n_examples, self.window), -1, dtype=torch.int32, device=device
        )
        self.window_acts: Float[Tensor, "group example window"] = torch.zeros(
            (groups, n_examples, self.window), dtype=torch.float16, device=device
        )

    def to(self, device: torch.device | str) -> "TopExamples":
        for name in ("values", "token_ids", "window_token_ids", "window_acts"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def update(self, tokens: Int[Tensor, "batch pos"], batch: LatentBatch) -> None:
        """Merge the candidates of one batch into the best examples so far."""
        device = self.values.device
        values16 = batch.topk.values.to(device).half()
        indices = batch.topk.indices.to(device)
        tokens = tokens.to(device)
        mask = None if batch.mask is None else batch.mask.to(device)
        candidates = self._candidates(values16, indices, mask)
        if candidates is None:
            return

        n = self.n_examples
        groups, slot = torch.unique(candidates.group, return_inverse=True)
        candidate_values = torch.full((groups.numel(), n), -torch.inf, device=device)
        candidate_values[slot, candidates.rank] = candidates.value
        candidate_index = torch.zeros((groups.numel(), n), dtype=torch.int64, device=device)
        candidate_index[slot, candidates.rank] = torch.arange(slot.numel(), device=device)
        merged = torch.cat([self.values[groups], candidate_values], dim=1)
        best_values, best = merged.topk(n, dim=1)
        is_kept = best < n
        kept_index = best.clamp(max=n - 1)
        new_index = candidate_index.gather(1, (best - n).clamp(min=0))

        # Windows only for the candidates that made it (few, once the best are high).
        entered = torch.zeros(slot.numel(), dtype=torch.bool, device=device)
        entered[new_index[~is_kept]] = True
        entrant_index = entered.nonzero().squeeze(1)
        entrants = candidates.select(entrant_index)
        entrant_of = torch.zeros(slot.numel(), dtype=torch.int64, device=device)
        entrant_of[entrant_index] = torch.arange(entrant_index.numel(), device=device)
        new_index = entrant_of[new_index]
        window_token_ids, window_acts = self._windows(tokens, values16, indices, mask, entrants)

        def choose(kept: Tensor, new: Tensor) -> Tensor:
            trailing = (1,) * (kept.ndim - 2)
            kept = kept.gather(1, kept_index.view(*best.shape, *trailing).expand_as(kept))
            if new.numel() == 0:
                return kept
            return torch.where(is_kept.view(*best.shape, *trailing), kept, new[new_index])

        token_ids = tokens[entrants.row, entrants.pos].int()
        self.token_ids[groups] = choose(self.token_ids[groups], token_ids)
        self.window_token_ids[groups] = choose(self.window_token_ids[groups], window_token_ids)
        self.window_acts[groups] = choose(self.window_acts[groups], window_acts)
        self.values[groups] = best_values

    def _candidates(
        self,
        values16: Float[Tensor, "layer batch pos k"],
        indices: Int[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None,
    ) -> "_Candidates | None":
        """The batch's best `n_examples` per (layer, latent) that beat the kept ones."""
        eligible = values16 > MIN_ACT
        if mask is not None:
            eligible &= mask[None, :, :, None]
        layer, row, pos, slot = eligible.nonzero(as_tuple=True)
        latent = indices[layer, row, pos, slot]
        value = values16[layer, row, pos, slot].float()
        group = layer * self.n_latents + latent
        beats_the_worst_kept = value > self.values[group, -1]
        if not beats_the_worst_kept.any():
            return None
        candidates = _Candidates(layer, row, pos, latent, group, value, value)
        candidates = candidates.select(beats_the_worst_kept)

        # Sort by group, then by value descending; rank within each group.
        order = torch.argsort(candidates.value, descending=True, stable=True)
        order = order[torch.argsort(candidates.group[order], stable=True)]
        candidates = candidates.select(order)
        position = torch.arange(order.numel(), device=order.device)
        starts = torch.ones_like(candidates.group, dtype=torch.bool)
        starts[1:] = candidates.group[1:] != candidates.group[:-1]
        rank = position - torch.cummax(torch.where(starts, position, 0), 0).values
        return candidates._replace(rank=rank).select(rank < self.n_examples)

    def _windows(
        self,
        tokens: Int[Tensor, "batch pos"],
        values16: Float[Tensor, "layer batch pos k"],
        indices: Int[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None,
        candidates: "_Candidates",
    ) -> tuple[Int[Tensor, "candidate window"], Float[Tensor, "candidate window"]]:
        """The context windows of the candidates, clipped to their own sequence."""
        layer, row, pos, latent = candidates[:4]
        n_positions, k = tokens.shape[1], indices.shape[-1]
        offsets = torch.arange(-self.n_tokens, self.n_tokens + 1, device=tokens.device)
        token_chunks, act_chunks = [], []
        chunk = max(1, _WINDOW_CHUNK_ELEMENTS // (self.window * k))
        for start in range(0, max(layer.numel(), 1), chunk):
            part = slice(start, start + chunk)
            window = pos[part, None] + offsets
            inside = (window >= 0) & (window < n_positions)
            window = window.clamp(0, n_positions - 1)
            rows = row[part, None].expand_as(window)
            window_tokens = tokens[rows, window].int().masked_fill(~inside, -1)
            same_latent = indices[layer[part, None], rows, window] == latent[part, None, None]
            acts = torch.where(same_latent, values16[layer[part, None], rows, window], 0).sum(-1)
            counted = inside if mask is None else inside & mask[rows, window]
            token_chunks.append(window_tokens)
            act_chunks.append(acts.masked_fill(~counted, 0))
        return torch.cat(token_chunks), torch.cat(act_chunks)

    def examples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Example]:
        """The kept examples, by latent, then layer, then act descending."""
        values, token_ids, window_token_ids, window_acts = (
            tensor.view(self.n_layers, self.n_latents, *tensor.shape[1:]).transpose(0, 1).cpu()
            for tensor in (self.values, self.token_ids, self.window_token_ids, self.window_acts)
        )
        decoded = _TokenNames(tokenizer)
        for latent, layer, example in torch.isfinite(values).nonzero().tolist():
            ids = window_token_ids[latent, layer, example]
            inside = ids >= 0
            window_ids = ids[inside].tolist()
            token_id = int(token_ids[latent, layer, example])
            yield Example(
                latent=latent,
                layer=layer,
                token_id=token_id,
                token=decoded.decode(token_id),
                act=float(values[latent, layer, example]),
                token_ids=window_ids,
                tokens=decoded.tokens(window_ids),
                acts=window_acts[latent, layer, example][inside].float().tolist(),
            )


class _Candidates(NamedTuple):
    """Candidate examples of one batch, one entry each."""

    layer: Int[Tensor, " candidate"]
    row: Int[Tensor, " candidate"]
    pos: Int[Tensor, " candidate"]
    latent: Int[Tensor, " candidate"]
    group: Int[Tensor, " candidate"]
    """`layer * n_latents + latent`."""
    value: Float[Tensor, " candidate"]
    rank: Tensor
    """The rank of the value within its group, once sorted."""

    def select(self, selection: Tensor) -> "_Candidates":
        return _Candidates(*(tensor[selection] for tensor in self))


class _TokenNames:
    """`tokenizer.decode` and `convert_ids_to_tokens`, once per token id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._decoded: dict[int, str] = {}
        self._tokens: dict[int, str] = {}

    def decode(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode(token_id)
        return self._decoded[token_id]

    def tokens(self, token_ids: list[int]) -> list[str]:
        missing = [token_id for token_id in token_ids if token_id not in self._tokens]
        if missing:
            names = self.tokenizer.convert_ids_to_tokens(missing)
            self._tokens.update(zip(missing, names, strict=True))
        return [self._tokens[token_id] for token_id in token_ids]


@torch.no_grad()
def collect_examples(
    source: LatentSource,
    batches: Iterable[dict[str, Tensor]],
    n_examples: int,
    n_tokens: int,
    *,
    total: int | None = None,
) -> TopExamples:
    """The top examples of `source` over every batch of `batches`."""
    top: TopExamples | None = None
    for batch in tqdm(batches, total=total, desc="examples", unit="batch"):
        latents = source.latents(batch["input_ids"])
        if top is None:
            top = TopExamples(
                source.n_layers, source.n_latents, n_examples, n_tokens, latents.topk.values.device
            )
        top.update(batch["input_ids"], latents)
    if top is None:
        raise ValueError("no batches to collect examples from")
    return top


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


def insert_examples(connection: sqlite3.Connection, examples: Iterable[Example]) -> int:
    """Insert examples (new ids); returns how many."""
    n_rows = 0
    for chunk in _chunks((example.serialize() for example in examples), _INSERT_CHUNK_ROWS):
        connection.executemany(
            "INSERT INTO examples (latent, layer, token_id, token, act, token_ids, tokens, acts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            chunk,
        )
        n_rows += len(chunk)
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


def write_db(
    examples: Iterable[Example],
    path: str | os.PathLike[str],
    n_layers: int | None = None,
    n_latents: int | None = None,
) -> Path:
    """Replace the database at `path` with `examples` (written aside, then moved).

    With `n_layers` and `n_latents`, the database also records the model's shape, so
    that `Examples.get` can reject a layer or latent out of range.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    connection = create_db(partial)
    try:
        insert_examples(connection, examples)
        if n_layers is not None and n_latents is not None:
            connection.execute("CREATE TABLE shape (n_layers INTEGER, n_latents INTEGER)")
            connection.execute("INSERT INTO shape VALUES (?, ?)", (n_layers, n_latents))
            connection.commit()
    finally:
        connection.close()
    os.replace(partial, path)
    return path


def import_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict, path: str | os.PathLike[str]
) -> Path:
    """Replace the database at `path` with the rows of an `-examples` dataset, ids kept
    when it has them."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    connection = create_db(partial)
    has_ids = "id" in dataset.column_names
    columns = list(COLUMNS if has_ids else COLUMNS[1:])
    placeholders = ", ".join("?" * len(columns))
    statement = f"INSERT INTO examples ({', '.join(columns)}) VALUES ({placeholders})"
    try:
        progress = tqdm(total=len(dataset), desc="importing examples", unit="row")
        for rows in dataset.select_columns(columns).iter(batch_size=_INSERT_CHUNK_ROWS):
            for name in ("token_ids", "tokens", "acts"):
                rows[name] = [
                    value if isinstance(value, str) else json.dumps(list(value))
                    for value in rows[name]
                ]
            connection.executemany(statement, zip(*(rows[name] for name in columns), strict=True))
            progress.update(len(rows["latent"]))
        progress.close()
        connection.commit()
    finally:
        connection.close()
    os.replace(partial, path)
    return path


def _load_rows(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """The rows of a local `-examples` dataset: a file, a `save_to_disk` folder, or a
    folder of data files."""
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), split="train")
    name = path.name.removesuffix(".zst").removesuffix(".gz")
    builder = _DATA_EXTENSIONS.get(Path(name).suffix)
    if builder is None:
        raise ValueError(f"cannot read examples from {path}: expected .db, .jsonl or .parquet")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


class Examples:
    """The examples of a model, from SQLite.

    `Examples(source)` opens, in turn: `source` as a `.db` file; `source` as local rows
    of an `-examples` dataset (a file or folder, imported into `<output_dir>/<its
    name>.db` unless that exists); the cache `<output_dir>/<owner>-<name>-examples.db`
    of the model `source` (hub id or local model folder); or the hub dataset
    `<owner>/<name>-examples`, imported into that cache.
    """

    def __init__(self, source: str | os.PathLike[str], output_dir: str = "out") -> None:
        path = Path(source)
        if path.suffix == ".db":
            if not path.is_file():
                raise FileNotFoundError(f"no examples database at {path}")
            self.path = path
        elif path.exists() and not (path / "config.json").exists():
            self.path = Path(output_dir) / f"{path.name.split('.')[0]}.db"
            if not self.path.exists():
                import_dataset(_load_rows(path), self.path)
        else:
            self.path = cache_path(str(source), "examples", "db", output_dir)
            if not self.path.exists():
                repo_id = derived_name(str(source), "examples")
                import_dataset(datasets.load_dataset(repo_id, split="train"), self.path)
        self.connection = sqlite3.connect(self.path)

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
        """The rows as an `-examples` dataset, built a chunk of rows at a time."""
        cursor = self.connection.execute(f"SELECT {', '.join(COLUMNS)} FROM examples ORDER BY id")
        parts = []
        while rows := cursor.fetchmany(_EXPORT_CHUNK_ROWS):
            columns = dict(zip(COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
            parts.append(datasets.Dataset.from_dict(columns, features=FEATURES))
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


def save_examples(config: ExamplesConfig) -> Examples:
    """Find the top examples of the configured model, write them to
    `config.output_dir` (and the hub with `push_to_hub`), and open them."""
    repo_id = config.resolved_repo_id()
    source = config.load_source()
    top = collect_examples(
        source,
        training_batches(config.data, source.tokenizer),
        config.n_examples,
        config.n_tokens,
        total=config.data.max_steps,
    )
    path = write_db(
        top.examples(source.tokenizer),
        cache_path(repo_id, "examples", "db", config.output_dir),
        n_layers=source.n_layers,
        n_latents=source.n_latents,
    )
    print(f"Saved the examples of {repo_id} to {path}")
    examples = Examples(path)
    if config.push_to_hub:
        examples.push_to_hub(derived_name(repo_id, "examples"))
    return examples


def main(args: list[str] | None = None) -> Examples:
    config = parse(ExamplesConfig, args)
    initialize(config.seed)
    return save_examples(config)


if __name__ == "__main__":
    main()
