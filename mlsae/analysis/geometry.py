"""The geometry of a transformer's residual stream: `python -m mlsae.analysis.geometry`.

Per layer (block output, no final norm), over the tokens of the stream:

- `norm`: the mean L2 norm of the residual vectors;
- `cos_sim`: the mean cosine similarity between a token's vectors at this layer and at
  the next one (as the original's `resid_cos_sim`), with its standard deviation over
  tokens;
- `centred_cos_sim`: the same after centring each layer's vectors by that layer's mean
  over all the tokens of the stream (`--centre=batch`: over the tokens of each batch).
  Centring by the stream's mean takes two passes over the text, the first for the means.

A first row (`layer = -1`) describes the embeddings, i.e. the input of the first block,
and their similarity to the output of the first layer of the stack. Special-token
positions are left out unless `--count_special_tokens`; their vectors are the model's
own (never zeroed). Only a transformer is needed (`--model_name`); with `--repo_id`, the
transformer of a pretrained `-tfm` model is used.

Output: `<output_dir>/<name>-geometry.csv`, one row per layer.
"""

import csv
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlsae.analysis.config import DEFAULT_MODEL_NAME
from mlsae.analysis.run import Saved, run_analysis
from mlsae.cli import DataConfig, run_command
from mlsae.files import atomic_output
from mlsae.lm.data import held_out_stream
from mlsae.lm.transformer import Transformer
from mlsae.utils import get_device

COLUMNS = (
    "layer",
    "block",
    "tokens",
    "norm",
    "cos_sim",
    "cos_sim_std",
    "centred_cos_sim",
    "centred_cos_sim_std",
)

Centre = Literal["stream", "batch"]


@dataclass
class GeometryConfig:
    """Norms and adjacent-layer cosine similarities of a transformer's residual stream."""

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    model_name: str | None = None
    """A hub id or local folder of a causal LM and its tokenizer (default
    EleutherAI/pythia-70m-deduped); with --repo_id, where the transformer's config and
    tokenizer are loaded from instead of the checkpoint's own model_name."""

    repo_id: str | None = None
    """A pretrained -tfm model (hub id or local folder) whose transformer and layers to
    use instead of --model_name's."""

    layers: list[int] | None = None
    """The blocks to read, without --repo_id (default: all)."""

    centre: Centre = "stream"
    """Centre each layer's vectors by its mean over the whole stream (two passes) or over
    each batch (one pass)."""

    count_special_tokens: bool = False
    """Count the special-token positions (BOS/EOS/PAD)."""

    output_dir: str = "out"
    """Where the CSV goes."""

    device: str | None = None
    """The device to run on (default: CUDA when available, otherwise the CPU)."""

    seed: int = 42
    """The seed of every random number generator."""

    def load_transformer(self) -> Transformer:
        device = torch.device(self.device) if self.device else get_device()
        if self.repo_id is None:
            model_name = self.model_name or DEFAULT_MODEL_NAME
            return Transformer(model_name, layers=self.layers, device=device)
        from mlsae.model.lightning import MLSAETransformer

        overrides = {} if self.model_name is None else {"model_name": self.model_name}
        model = MLSAETransformer.from_pretrained(self.repo_id, **overrides)
        model.requires_grad_(False)
        return model.transformer.to(device)

    def name(self) -> str:
        return Path((self.repo_id or self.model_name or DEFAULT_MODEL_NAME).rstrip("/")).name


class _Moments:
    """Streaming sum and sum of squares of per-token values, per layer, in float64."""

    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.sum = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.squares = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def update(self, values: Float[Tensor, "layer token"]) -> None:
        values = values.double()
        self.sum += values.sum(-1)
        self.squares += (values**2).sum(-1)

    def mean(self, count: int) -> Float[Tensor, " layer"]:
        return self.sum / count

    def std(self, count: int) -> Float[Tensor, " layer"]:
        """The unbiased standard deviation over tokens."""
        mean = self.sum / count
        return ((self.squares - count * mean**2) / (count - 1)).clamp(min=0).sqrt()


def residual_vectors(
    transformer: Transformer,
    tokens: Int[Tensor, "batch pos"],
    count_special_tokens: bool = False,
) -> Float[Tensor, "layer token d_model"]:
    """The embeddings (the first block's input) and the output of each selected block, at
    the positions that count, stacked: index 0 is the embeddings, index i + 1 the layer i
    of the stack."""
    tokens = tokens.to(transformer.device)
    captured: list[Tensor] = []

    def capture_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = transformer.blocks[0].register_forward_pre_hook(capture_input, with_kwargs=True)
    try:
        outputs = transformer.residual_stream(tokens)
    finally:
        handle.remove()
    stack = torch.cat([captured[0].unsqueeze(0), outputs]).float()
    if count_special_tokens:
        return stack.flatten(1, 2)
    return stack[:, ~transformer.special_token_mask(tokens)]


def _layer_means(
    vectors: Callable[[Tensor], Tensor], batches: Iterable[dict[str, Tensor]], total: int | None
) -> tuple[Float[Tensor, "layer d_model"], int]:
    sums: Tensor | None = None
    count = 0
    for batch in tqdm(batches, total=total, desc="geometry (means)", unit="batch"):
        stack = vectors(batch["input_ids"])
        batch_sum = stack.double().sum(1)
        sums = batch_sum if sums is None else sums + batch_sum
        count += stack.shape[1]
    if sums is None or count == 0:
        raise ValueError("no tokens were processed")
    return sums / count, count


@torch.no_grad()
def residual_geometry(
    transformer: Transformer,
    batches: Iterable[dict[str, Tensor]],
    *,
    centre: Centre = "stream",
    count_special_tokens: bool = False,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """One row per layer (columns `COLUMNS`), the embeddings first (`layer = -1`).

    With `centre="stream"`, `batches` is iterated twice, so it must be re-iterable (a
    DataLoader or a list, not a generator). The last row's similarities are NaN: it has no
    next layer.
    """
    if centre not in ("stream", "batch"):
        raise ValueError(f"centre must be 'stream' or 'batch', got {centre!r}")

    def vectors(tokens: Tensor) -> Tensor:
        return residual_vectors(transformer, tokens, count_special_tokens)

    stream_means = None
    if centre == "stream":
        if iter(batches) is batches:
            raise ValueError("centre='stream' needs re-iterable batches, not an iterator")
        stream_means, _ = _layer_means(vectors, batches, total)

    n_rows = transformer.n_layers + 1
    device = transformer.device
    norms, cos_sims, centred_cos_sims = (_Moments(n_rows, device) for _ in range(3))
    count = 0
    for batch in tqdm(batches, total=total, desc="geometry", unit="batch"):
        stack = vectors(batch["input_ids"])
        if stack.shape[1] == 0:
            continue
        count += stack.shape[1]
        norms.update(stack.norm(dim=-1))
        cos_sims.update(adjacent_cos_sim(stack))
        means = stream_means if stream_means is not None else stack.double().mean(1)
        centred_cos_sims.update(adjacent_cos_sim(stack - means.to(stack.dtype).unsqueeze(1)))
    if count < 2:
        raise ValueError(f"need at least 2 tokens, got {count}")

    nan = torch.tensor([float("nan")], dtype=torch.float64, device=device)
    columns = {
        "norm": norms.mean(count),
        "cos_sim": torch.cat([cos_sims.mean(count)[:-1], nan]),
        "cos_sim_std": torch.cat([cos_sims.std(count)[:-1], nan]),
        "centred_cos_sim": torch.cat([centred_cos_sims.mean(count)[:-1], nan]),
        "centred_cos_sim_std": torch.cat([centred_cos_sims.std(count)[:-1], nan]),
    }
    columns = {name: values.tolist() for name, values in columns.items()}
    blocks = [-1, *transformer.layers]
    return [
        {
            "layer": row - 1,
            "block": blocks[row],
            "tokens": count,
            **{name: values[row] for name, values in columns.items()},
        }
        for row in range(n_rows)
    ]


def adjacent_cos_sim(stack: Float[Tensor, "layer token d_model"]) -> Float[Tensor, "layer token"]:
    """Per token, the cosine similarity of each layer's vector with the next layer's; the
    last layer's row is 0 (it has no next layer)."""
    similarities = F.cosine_similarity(stack[:-1], stack[1:], dim=-1)
    return torch.cat([similarities, torch.zeros_like(similarities[:1])])


def write_rows(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def save_geometry(config: GeometryConfig) -> Saved[list[dict[str, Any]]]:
    """Compute the geometry of the configured transformer and write the CSV."""
    transformer = config.load_transformer()
    rows = residual_geometry(
        transformer,
        held_out_stream(config.data, transformer.tokenizer),
        centre=config.centre,
        count_special_tokens=config.count_special_tokens,
        total=config.data.max_steps,
    )
    path = Path(config.output_dir) / f"{config.name()}-geometry.csv"
    write_rows(rows, path)
    return Saved(rows, [(f"the residual-stream geometry ({rows[0]['tokens']} tokens)", path)])


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    return run_analysis(GeometryConfig, save_geometry, args)


if __name__ == "__main__":
    run_command(main)
