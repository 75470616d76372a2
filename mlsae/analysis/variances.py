"""How much wider a latent's layer distribution is over many tokens than on one token:
`python -m mlsae.analysis.variances`.

The paper finds that a latent's distribution over layers, aggregated over tokens, has a
variance about 100 times that of its distribution on a single token: a latent is active
at a few adjacent layers on any one token, but at different layers on different tokens.
`--definition` picks how the two sides are computed (docs/variances.md compares them).

`consistent` (the default). The layer is the index into the model's stack, 0 .. L - 1.

- On one token (position) t, the weight of latent i at layer l is its top-k value there
  after ReLU (0 where it is not selected). Where the weights sum to more than 0, the
  latent is *active* on t; the weights, normalised, are its distribution over layers on
  t, `p[t, i]`, with mean layer `mu[t, i]` and variance `V[t, i]` (the token variance).
- The latent's aggregated distribution is the mean of `p[t, i]` over the n_i tokens it is
  active on, and `A[i]` its variance (the aggregate variance). Each active token counts
  once, as on the token side, so `A[i] = mean_t V[t, i] + var_t mu[t, i]` (the law of
  total variance): `A[i]` is never below the latent's mean token variance, and the
  excess is how much its tokens disagree on where it is.
- Headline: both sides averaged over the active (token, latent) pairs, `mean_token_variance
  = sum V / N` and `mean_aggregate_variance = sum_i n_i A[i] / N` (N = sum_i n_i), and
  `ratio`, the second over the first. Weighting every active pair once on both sides
  makes the ratio the pooled total over pooled within-token variance, so it is at least 1,
  and latents that are dead or fire on a handful of tokens (whose aggregate rests on those
  few) weigh in proportion to the evidence they bring. The same averaged over the active
  latents, each counting once, is given as `mean_latent_token_variance`,
  `mean_latent_aggregate_variance` and `latent_ratio`.
- A ratio whose denominator is 0 (every active latent at one layer on every token) is
  `inf`, or NaN where the numerator is 0 too or no latent is active.

Special-token positions are left out unless `--count_special_tokens`. Every statistic is
exact for the tokens processed, over the whole stream.

`original`: the original script's quantities (`mlsae.analysis.variances_original`), which
reproduce its CSV with `--count_special_tokens true`.

Outputs, in `--output_dir` (default `out/`). `consistent`: `<owner>-<name>-variances.csv`
(one row: the headline numbers), `...-variances-latents.csv` (one row per latent: active
tokens, mean token variance, aggregate variance) and `...-variances-tokens.safetensors`
(`token_ids`, `variance` and `n_active`, one entry per counted token, in stream order:
the mean token variance over the latents active on it and how many are; its metadata
records the model that wrote it). `original`: `...-variances-original.csv`, the original's
row.
"""

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.identity import read_safetensors_origin
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.analysis.source import LatentBatch, LatentSource
from mlsae.analysis.variances_original import (
    OriginalVariances,
    collect_original_variances,
    original_model_columns,
)
from mlsae.cli import DataConfig, run_command
from mlsae.files import atomic_output
from mlsae.metrics.layers import layer_variance

LATENT_COLUMNS = ("latent", "active_tokens", "token_variance", "aggregate_variance")

Definition = Literal["consistent", "original"]


@dataclass
class VariancesConfig(AnalysisConfig):
    """Compare the variance over layers of latents on single tokens and over many tokens."""

    stack_refusal: ClassVar[str | None] = (
        "variances compares each latent's distribution over layers, which a stack of "
        "per-layer SAEs has not: latent i of one layer's SAE is unrelated to latent i of "
        "another's"
    )

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    definition: Definition = "consistent"
    """consistent: variances of normalised distributions, both sides averaged over the
    active (token, latent) pairs; original: the original script's quantities and CSV
    (with --count_special_tokens true, its numbers). See docs/variances.md."""


def ratio_of(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, `inf` for a positive numerator over 0, NaN for 0 / 0."""
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


@dataclass
class Variances:
    """The layer variances of every latent, on single tokens and aggregated over tokens."""

    token_variance_sum: Float[Tensor, " latent"]
    """Per latent, the sum of its token variances over the tokens it is active on."""

    active_tokens: Int[Tensor, " latent"]
    """Per latent, the number of tokens it is active on."""

    distribution_sums: Float[Tensor, "layer latent"]
    """Per layer and latent, the sum of its per-token distributions over layers, over the
    tokens it is active on (so each latent's column sums to its active tokens)."""

    token_ids: Int[Tensor, " token"]
    """The counted tokens, in stream order."""

    token_variance: Float[Tensor, " token"]
    """Per counted token, the mean token variance over the latents active on it (NaN when
    none is)."""

    n_active: Int[Tensor, " token"]
    """Per counted token, the number of latents active on it."""

    @property
    def n_layers(self) -> int:
        return self.distribution_sums.shape[0]

    @property
    def n_latents(self) -> int:
        return self.distribution_sums.shape[1]

    @property
    def latent_token_variance(self) -> Float[Tensor, " latent"]:
        """Per latent, its mean token variance (NaN for latents never active)."""
        return self.token_variance_sum / self.active_tokens

    @property
    def aggregate_variance(self) -> Float[Tensor, " latent"]:
        """Per latent, the variance of the mean of its per-token distributions over the
        tokens it is active on (NaN for latents never active)."""
        return layer_variance(self.distribution_sums)

    @property
    def active_pairs(self) -> int:
        return int(self.active_tokens.sum())

    @property
    def mean_token_variance(self) -> float:
        """The mean token variance over the active (token, latent) pairs."""
        return (
            float(self.token_variance_sum.sum()) / self.active_pairs
            if self.active_pairs
            else math.nan
        )

    @property
    def mean_aggregate_variance(self) -> float:
        """The mean over the active (token, latent) pairs of their latent's aggregate
        variance: each latent weighted by its active tokens."""
        if not self.active_pairs:
            return math.nan
        weighted = self.aggregate_variance.nan_to_num(0.0) * self.active_tokens
        return float(weighted.sum()) / self.active_pairs

    @property
    def ratio(self) -> float:
        """The mean aggregate variance over the mean token variance (the paper's ~100x)."""
        return ratio_of(self.mean_aggregate_variance, self.mean_token_variance)

    @property
    def mean_latent_token_variance(self) -> float:
        """The mean over the active latents, each counting once, of their mean token
        variance."""
        return float(self.latent_token_variance.nanmean())

    @property
    def mean_latent_aggregate_variance(self) -> float:
        """The mean aggregate variance over the active latents, each counting once."""
        return float(self.aggregate_variance.nanmean())

    @property
    def latent_ratio(self) -> float:
        """The ratio with every active latent counting once on both sides."""
        return ratio_of(self.mean_latent_aggregate_variance, self.mean_latent_token_variance)

    def summary(self) -> dict[str, float | int]:
        """The headline numbers, pair-weighted, then weighted per latent."""
        return {
            "tokens": int(self.token_ids.numel()),
            "active_pairs": self.active_pairs,
            "active_latents": int((self.active_tokens > 0).sum()),
            "mean_token_variance": self.mean_token_variance,
            "mean_aggregate_variance": self.mean_aggregate_variance,
            "ratio": self.ratio,
            "mean_latent_token_variance": self.mean_latent_token_variance,
            "mean_latent_aggregate_variance": self.mean_latent_aggregate_variance,
            "latent_ratio": self.latent_ratio,
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
        self._distribution_sums: Tensor | None = None
        self._token_ids: list[Tensor] = []
        self._token_variance: list[Tensor] = []
        self._n_active: list[Tensor] = []

    def _start(self, device: torch.device) -> None:
        self._token_variance_sum = torch.zeros(self.n_latents, dtype=torch.float64, device=device)
        self._active_tokens = torch.zeros(self.n_latents, dtype=torch.int64, device=device)
        self._distribution_sums = torch.zeros(
            self.n_layers, self.n_latents, dtype=torch.float64, device=device
        )

    def update(self, batch: LatentBatch, token_ids: Int[Tensor, "batch pos"] | None = None) -> None:
        """Add the tokens of one batch (`token_ids` are kept for the per-token output)."""
        values, indices = batch.topk
        device = indices.device
        if self._distribution_sums is None:
            self._start(device)
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

        # One group per (token, latent): the entries of that latent at every layer.
        token = torch.arange(n_tokens, device=device).view(1, -1, 1).expand_as(indices)
        layer = torch.arange(self.n_layers, device=device).view(-1, 1, 1).expand_as(indices)
        keys = (token * self.n_latents + indices).flatten()
        pairs, group = torch.unique(keys, return_inverse=True)
        weights, layer = weights.flatten(), layer.flatten()

        def group_sum(x: Tensor) -> Tensor:
            return torch.zeros(len(pairs), dtype=x.dtype, device=device).index_add_(0, group, x)

        total = group_sum(weights)
        active = total > 0
        # Division by zero only in inactive groups, whose results are dropped.
        probs = weights / total[group]
        mean = group_sum(probs * layer)
        variance = group_sum(probs * (layer - mean[group]) ** 2)

        entry_latent = indices.flatten()
        entry_active = active[group]
        self._distribution_sums.view(-1).index_add_(
            0,
            (layer * self.n_latents + entry_latent)[entry_active],
            probs[entry_active],
        )
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
        if self._distribution_sums is None:
            raise ValueError("no batches were accumulated")
        return Variances(
            token_variance_sum=self._token_variance_sum,
            active_tokens=self._active_tokens,
            distribution_sums=self._distribution_sums,
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


def save_consistent_variances(model: AnalysedModel) -> Saved[Variances]:
    """The default definition's three outputs."""
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


def save_original_variances(model: AnalysedModel) -> Saved[OriginalVariances]:
    """The original definition's CSV row."""
    variances = collect_original_variances(model.source, model.batches(), total=model.max_steps)
    path = model.output_path("variances-original", "csv")
    write_csv([variances.row(original_model_columns(model.source.model))], path)
    note = (
        f"{model.repo_id} (original definition): exp_var_l_tf {variances.exp_var_l_tf:.4g}, "
        f"exp_var_l_f {variances.exp_var_l_f:.4g}, rel_var_t {variances.rel_var_t:.4g} "
        f"(aggregate over token {variances.aggregate_over_token:.4g}; {variances.tokens} "
        "tokens)"
    )
    return Saved(variances, [("the original's statistics", path)], [note])


def save_variances(config: VariancesConfig) -> Saved[Variances] | Saved[OriginalVariances]:
    """Compute the variances of the configured model under `config.definition` and write
    them to `config.output_dir`."""
    model = AnalysedModel.load(config)
    if config.definition == "original":
        return save_original_variances(model)
    return save_consistent_variances(model)


def main(args: list[str] | None = None) -> Variances | OriginalVariances:
    return run_analysis(VariancesConfig, save_variances, args)


if __name__ == "__main__":
    run_command(main)
