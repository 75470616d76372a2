"""The top activating examples of every latent at every layer:
`python -m mlsae.analysis.examples`.

Streams text through a pretrained MLSAE and keeps, for every (layer, latent), the
`n_examples` token positions with the largest top-k values, each with a context window of
up to `n_tokens` tokens either side, clipped to its own sequence. Values are the pre-ReLU
top-k values rounded to float16, as published; only values above the firing threshold
(`mlsae.metrics.FIRING_THRESHOLD`, 1e-3, compared after rounding) count, and positions
outside the mask (special tokens, unless `--count_special_tokens`) never do. The best
examples are kept on the device of the model while streaming, in tensors of
`n_layers * n_latents * n_examples` entries.

The examples are written to SQLite, `<output_dir>/<owner>-<name>-examples.db`, with the
columns of a published `-examples` dataset (`id, latent, layer, token_id, token, act,
token_ids, tokens, acts`; the last three are JSON strings of the context window), and the
identity of the model that wrote them (see `mlsae.analysis.examples_db`), under a second
progress bar that counts the rows written; the last line says how many went where. Read
them with `Examples(repo_id).get(layer, latent)`; `Examples` also imports published
`-examples` datasets (hub or local files) into that cache.

Unlike the original, windows never cross into the neighbouring sequence nor come out
empty near its start (it sliced the flattened batch), special tokens are left out by
default, and exactly `max_tokens // (batch_size * max_length)` batches are processed.
"""

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.examples_db import (
    COLUMNS,
    FEATURES,
    Example,
    Examples,
    create_db,
    import_dataset,
    insert_examples,
    read_origin,
    write_db,
)
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.analysis.source import LatentBatch, LatentSource
from mlsae.cli import run_command
from mlsae.metrics.firing import FIRING_THRESHOLD

__all__ = [
    "COLUMNS",
    "FEATURES",
    "Example",
    "Examples",
    "ExamplesConfig",
    "TopExamples",
    "collect_examples",
    "create_db",
    "import_dataset",
    "insert_examples",
    "main",
    "save_examples",
    "write_db",
]

_WINDOW_CHUNK_ELEMENTS = 1 << 24


@dataclass
class ExamplesConfig(AnalysisConfig):
    """Find the top activating examples of every latent of a pretrained MLSAE at every
    layer."""

    hub_suffix: ClassVar[str | None] = "examples"

    n_examples: int = 32
    """Examples kept per latent and layer."""

    n_tokens: int = 4
    """Context tokens either side of an example's token (clipped to its sequence)."""


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
        # Compared in float16, as the original did.
        eligible = values16 > FIRING_THRESHOLD
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

    def __len__(self) -> int:
        """How many examples are kept (the rows that `examples` yields)."""
        return int(torch.isfinite(self.values).sum())

    def examples(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[Example]:
        """The kept examples, by latent, then layer, then act descending."""
        by_latent = [
            tensor.view(self.n_layers, self.n_latents, *tensor.shape[1:]).transpose(0, 1).cpu()
            for tensor in (self.values, self.token_ids, self.window_token_ids, self.window_acts)
        ]
        decoded = _TokenNames(tokenizer)
        for latent in range(self.n_latents):
            # One conversion to Python lists per latent: indexing tensors element by element
            # would cost more than everything else done per example.
            columns = [tensor[latent].tolist() for tensor in by_latent]
            for layer, slots in enumerate(zip(*columns, strict=True)):
                yield from _layer_examples(latent, layer, *slots, decoded)


def _layer_examples(
    latent: int,
    layer: int,
    values: list[float],
    token_ids: list[int],
    window_token_ids: list[list[int]],
    window_acts: list[list[float]],
    decoded: "_TokenNames",
) -> Iterator[Example]:
    """The examples of one (layer, latent) from its slots as Python lists (empty slots,
    valued `-inf`, left out; window positions outside the sequence, -1, dropped)."""
    for value, token_id, ids, acts in zip(
        values, token_ids, window_token_ids, window_acts, strict=True
    ):
        if not math.isfinite(value):
            continue
        if min(ids) < 0:
            inside = [index for index, window_id in enumerate(ids) if window_id >= 0]
            ids, acts = [ids[index] for index in inside], [acts[index] for index in inside]
        yield Example(
            latent=latent,
            layer=layer,
            token_id=token_id,
            token=decoded.decode(token_id),
            act=value,
            token_ids=ids,
            tokens=decoded.tokens(ids),
            acts=acts,
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
        try:
            return [self._tokens[token_id] for token_id in token_ids]
        except KeyError:
            missing = [token_id for token_id in token_ids if token_id not in self._tokens]
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


def save_examples(config: ExamplesConfig) -> Saved[Examples]:
    """Find the top examples of the configured model, write them to `config.output_dir`,
    and open them."""
    model = AnalysedModel.load(config)
    source = model.source
    top = collect_examples(
        source, model.batches(), config.n_examples, config.n_tokens, total=model.max_steps
    )
    path = model.output_path("examples", "db")
    notes = model.replacement_notes(path, read_origin(path))
    n_rows = len(top)
    write_db(
        top.examples(source.tokenizer),
        path,
        n_layers=source.n_layers,
        n_latents=source.n_latents,
        origin=model.origin,
        progress=True,
        total=n_rows,
    )
    examples = Examples(path)
    outputs = [(f"{n_rows:,} examples of {model.repo_id}", path)]
    return Saved(examples, outputs, notes, push=examples.push_to_hub, dataset_id=model.dataset_id())


def main(args: list[str] | None = None) -> Examples:
    return run_analysis(ExamplesConfig, save_examples, args)


if __name__ == "__main__":
    run_command(main)
