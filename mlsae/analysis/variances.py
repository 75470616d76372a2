"""How much wider a latent's layer distribution is over many tokens than on one token:
`python -m mlsae.analysis.variances`.

The paper finds that a latent's distribution over layers, aggregated over tokens, has a
variance about 100 times that of its distribution on a single token: a latent is active
at a few adjacent layers on any one token, but at different layers on different tokens.

Definitions (the layer is the index into the model's stack, 0 .. n_layers - 1):

- On one token (position) t, the weight of latent i at layer l is its top-k value there
  after ReLU (0 where it is not selected). Where the weights sum to more than 0, the
  latent is *active* on t; the weights, normalised, are its distribution over layers on
  t, and `token variance` is that distribution's variance.
- Summing the weights over all tokens gives the latent's aggregated distribution and its
  `aggregate variance`.

Reported: the mean token variance over the active (token, latent) pairs, the mean
aggregate variance over the latents active on some token, and their ratio; per latent,
its mean token variance and its aggregate variance; per token, the mean token variance
over the latents active on it. Special-token positions are left out unless
`--count_special_tokens`. Every statistic is exact for the tokens processed. (The
original's script averaged over every (token, latent) pair, inactive ones included as 0,
and over batches; here only active pairs and latents count, over the whole stream.)

Outputs, in `--output_dir` (default `out/`): `<owner>-<name>-variances.csv` (one row),
`...-variances-latents.csv` (one row per latent) and `...-variances-tokens.safetensors`
(`token_ids`, `variance` and `n_active`, one entry per counted token, in stream order;
its metadata records the model that wrote it).
"""

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.identity import read_safetensors_origin
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.analysis.source import LatentBatch, LatentSource
from mlsae.cli import DataConfig, run_command
from mlsae.files import atomic_output
from mlsae.metrics.layers import layer_variance

LATENT_COLUMNS = ("latent", "active_tokens", "token_variance", "aggregate_variance")


@dataclass
class VariancesConfig(AnalysisConfig):
    """Compare the variance over layers of latents on single tokens and over many tokens."""

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )


@dataclass
class Variances:
    """The layer variances of every latent, on single tokens and aggregated over tokens."""

    token_variance_sum: Float[Tensor, " latent"]
    """Per latent, the sum of its token variances over the tokens it is active on."""

    active_tokens: Int[Tensor, " latent"]
    """Per latent, the number of tokens it is active on."""

    layer_totals: Float[Tensor, "layer latent"]
    """Per layer and latent, the sum over tokens of the weights (top-k values after ReLU)."""

    token_ids: Int[Tensor, " token"]
    """The counted tokens, in stream order."""

    token_variance: Float[Tensor, " token"]
    """Per counted token, the mean token variance over the latents active on it (NaN when
    none is)."""

    n_active: Int[Tensor, " token"]
    """Per counted token, the number of latents active on it."""

    @property
    def n_layers(self) -> int:
        return self.layer_totals.shape[0]

    @property
    def n_latents(self) -> int:
        return self.layer_totals.shape[1]

    @property
    def latent_token_variance(self) -> Float[Tensor, " latent"]:
        """Per latent, its mean token variance (NaN for latents never active)."""
        return self.token_variance_sum / self.active_tokens

    @property
    def aggregate_variance(self) -> Float[Tensor, " latent"]:
        """Per latent, the variance of its aggregated distribution (NaN if never active)."""
        return layer_variance(self.layer_totals)

    @property
    def mean_token_variance(self) -> float:
        """The mean token variance over the active (token, latent) pairs."""
        return float(self.token_variance_sum.sum() / self.active_tokens.sum())

    @property
    def mean_aggregate_variance(self) -> float:
        """The mean aggregate variance over the latents active on some token."""
        return float(self.aggregate_variance.nanmean())

    @property
    def ratio(self) -> float:
        """The mean aggregate variance over the mean token variance (the paper's ~100x)."""
        return self.mean_aggregate_variance / self.mean_token_variance

    def summary(self) -> dict[str, float | int]:
        """The headline numbers; `mean_latent_token_variance` weights every active latent
        equally (the mean over latents of their mean token variance), like the aggregate."""
        return {
            "tokens": int(self.token_ids.numel()),
            "active_pairs": int(self.active_tokens.sum()),
            "active_latents": int((self.active_tokens > 0).sum()),
            "mean_token_variance": self.mean_token_variance,
            "mean_latent_token_variance": float(self.latent_token_variance.nanmean()),
            "mean_aggregate_variance": self.mean_aggregate_variance,
            "ratio": self.ratio,
        }

    def latent_rows(self) -> list[dict[str, Any]]:
        """One row per latent, with the columns of `LATENT_COLUMNS`."""
        columns = zip(
            self.active_tokens.tolist(),
            self.latent_token_variance.tolist(),
            self.aggregate_variance.tolist(),
            strict=True,
        )
        return [
            dict(zip(LATENT_COLUMNS, (latent, *values), strict=True))
            for latent, values in enumerate(columns)
        ]


class VariancesAccumulator:
    """Streaming, exact token and aggregate layer variances over batches of latents.

    Works on the sparse top-k entries (no `[layer, token, latent]` tensor): the entries of
    one token are grouped by latent, so memory grows with `layer x token x k`. Sums are
    kept in float64 on the device of the latents.
    """

    def __init__(self, n_layers: int, n_latents: int) -> None:
        self.n_layers = n_layers
        self.n_latents = n_latents
        self._token_variance_sum: Tensor | None = None
        self._active_tokens: Tensor | None = None
        self._layer_totals: Tensor | None = None
        self._token_ids: list[Tensor] = []
        self._token_variance: list[Tensor] = []
        self._n_active: list[Tensor] = []

    def update(self, batch: LatentBatch, token_ids: Int[Tensor, "batch pos"] | None = None) -> None:
        """Add the tokens of one batch (`token_ids` are kept for the per-token output)."""
        values, indices = batch.topk
        device = indices.device
        if self._layer_totals is None:
            self._token_variance_sum = torch.zeros(
                self.n_latents, dtype=torch.float64, device=device
            )
            self._active_tokens = torch.zeros(self.n_latents, dtype=torch.int64, device=device)
            self._layer_totals = torch.zeros(
                self.n_layers, self.n_latents, dtype=torch.float64, device=device
            )
        if token_ids is None:
            token_ids = torch.full(indices.shape[1:3], -1, dtype=torch.int64)
        token_ids = token_ids.to(device)
        if batch.mask is not None:
            mask = batch.mask.to(device)
            values, indices, token_ids = values[:, mask], indices[:, mask], token_ids[mask]
        else:
            values, indices = values.flatten(1, 2), indices.flatten(1, 2)
            token_ids = token_ids.flatten()
        # [layer, token, k]
        weights = values.double().clamp(min=0)
        n_tokens = indices.shape[1]

        self._layer_totals.scatter_add_(
            1, indices.reshape(self.n_layers, -1), weights.reshape(self.n_layers, -1)
        )

        # One group per (token, latent): the entries of that latent at every layer.
        token = torch.arange(n_tokens, device=device).view(1, -1, 1).expand_as(indices)
        layer = torch.arange(self.n_layers, device=device).view(-1, 1, 1).expand_as(indices)
        keys = (token * self.n_latents + indices).flatten()
        pairs, group = torch.unique(keys, return_inverse=True)
        weights, layer = weights.flatten(), layer.flatten().double()

        def group_sum(x: Tensor) -> Tensor:
            return torch.zeros(len(pairs), dtype=x.dtype, device=device).index_add_(0, group, x)

        total = group_sum(weights)
        active = total > 0
        # Division by zero only in inactive groups, whose results are dropped.
        mean = group_sum(weights * layer) / total
        variance = group_sum(weights * (layer - mean[group]) ** 2) / total

        pair_token = torch.div(pairs, self.n_latents, rounding_mode="floor")[active]
        pair_latent = (pairs % self.n_latents)[active]
        variance = variance[active]
        self._token_variance_sum.index_add_(0, pair_latent, variance)
        self._active_tokens.index_add_(0, pair_latent, torch.ones_like(pair_latent))

        per_token_sum = torch.zeros(n_tokens, dtype=torch.float64, device=device)
        per_token_sum.index_add_(0, pair_token, variance)
        n_active = torch.zeros(n_tokens, dtype=torch.int64, device=device)
        n_active.index_add_(0, pair_token, torch.ones_like(pair_token))
        self._token_ids.append(token_ids.cpu())
        self._token_variance.append((per_token_sum / n_active).cpu())
        self._n_active.append(n_active.cpu())

    def compute(self) -> Variances:
        if self._layer_totals is None:
            raise ValueError("no batches were accumulated")
        return Variances(
            token_variance_sum=self._token_variance_sum,
            active_tokens=self._active_tokens,
            layer_totals=self._layer_totals,
            token_ids=torch.cat(self._token_ids),
            token_variance=torch.cat(self._token_variance),
            n_active=torch.cat(self._n_active),
        )


@torch.no_grad()
def collect_variances(
    source: LatentSource,
    batches: Iterable[dict[str, Tensor]],
    *,
    total: int | None = None,
) -> Variances:
    """The token and aggregate layer variances of `source` over every batch of `batches`."""
    accumulator = VariancesAccumulator(source.n_layers, source.n_latents)
    for batch in tqdm(batches, total=total, desc="variances", unit="batch"):
        tokens = batch["input_ids"]
        accumulator.update(source.latents(tokens), tokens)
    return accumulator.compute()


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_variances(config: VariancesConfig) -> Saved[Variances]:
    """Compute the variances of the configured model and write them to `config.output_dir`."""
    model = AnalysedModel.load(config)
    variances = collect_variances(model.source, model.batches(), total=model.max_steps)
    summary_path = model.output_path("variances", "csv")
    latents_path = summary_path.with_name(f"{summary_path.stem}-latents.csv")
    tokens_path = summary_path.with_name(f"{summary_path.stem}-tokens.safetensors")
    notes = model.replacement_notes(tokens_path, read_safetensors_origin(tokens_path))
    summary = variances.summary()
    write_csv([{"repo_id": model.repo_id, **summary}], summary_path)
    write_csv(variances.latent_rows(), latents_path)
    tensors = {
        "token_ids": variances.token_ids.contiguous(),
        "variance": variances.token_variance.contiguous(),
        "n_active": variances.n_active.contiguous(),
    }
    with atomic_output(tokens_path) as partial:
        save_file(tensors, partial, metadata=model.origin.to_metadata() or None)
    notes.append(
        f"{model.repo_id}: mean token variance {summary['mean_token_variance']:.4g}, mean "
        f"aggregate variance {summary['mean_aggregate_variance']:.4g}, ratio "
        f"{summary['ratio']:.4g} ({summary['tokens']} tokens)"
    )
    outputs = [
        ("the summary", summary_path),
        ("the variances per latent", latents_path),
        ("the variances per token", tokens_path),
    ]
    return Saved(variances, outputs, notes)


def main(args: list[str] | None = None) -> Variances:
    return run_analysis(VariancesConfig, save_variances, args)


if __name__ == "__main__":
    run_command(main)
