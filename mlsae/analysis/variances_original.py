"""The original script's definition of the variances (`--definition original`).

The paper's comparison ("about two orders of magnitude greater when aggregating over
tokens") comes from these quantities, computed per batch of `batch_size x max_length`
tokens and then averaged over batches. With `a[l, t, i]` the top-k value of latent i at
layer l on token t, before ReLU (0 where it is not selected), T the tokens of the batch,
F the latents and `var(x) = sum_l l^2 x_l - (sum_l l x_l)^2`:

- `p[l, t, i] = a[l, t, i] / sum_l a[l, t, i]`, and 0 where that sum is 0 (every pair
  where the latent is selected at no layer);
- `exp_var_l_tf = mean over (t, i) of var(p[:, t, i])`: the token variance, averaged over
  all T x F pairs, the inactive ones counting 0;
- `q[l, i] = mean over t of p[l, t, i]` and `exp_var_l_f = mean over i of var(q[:, i])`.
  `q` is not normalised: its mass is the share s of tokens the latent is selected on, so
  `var(q) = s Var + s (1 - s) mu^2` for the mean mu and variance Var of the normalised
  aggregate (a latent selected only at layer 3 on 10% of tokens scores 0.81, not 0);
- `var_l = var(mean over i of q[:, i])`;
- `rel_var_f = exp_var_l_f / var_l` and `rel_var_t = exp_var_l_tf / exp_var_l_f`, per
  batch.

The columns are the means over batches of these five (`rel_var_t` is the original's
single-token over aggregate ratio, so the paper's finding reads as its inverse), with
`step` (the index of the last batch) and `tokens` (the tokens processed). With
`--count_special_tokens true` this reproduces the original's CSV; otherwise the special
tokens are left out of every batch. Sums are in float64 over the sparse top-k entries, so
no `[layer, token, latent]` tensor is built. Unlike the original, the stream stops after
`--max_tokens` (the original read two batches more when the data lasted).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.source import LatentBatch, LatentSource

ORIGINAL_COLUMNS = (
    "model_name",
    "n_layers",
    "n_latents",
    "expansion_factor",
    "k",
    "step",
    "tokens",
    "exp_var_l_f",
    "exp_var_l_tf",
    "var_l",
    "rel_var_f",
    "rel_var_t",
)
"""The columns of the original's CSV, in its order."""

STATISTICS = ("exp_var_l_f", "exp_var_l_tf", "var_l", "rel_var_f", "rel_var_t")


def original_model_columns(model: Any) -> dict[str, Any]:
    """The original's columns that describe the model (an `MLSAETransformer`)."""
    return {name: getattr(model, name) for name in ORIGINAL_COLUMNS[:5]}


def uncentred_variance(probs: Float[Tensor, "layer ..."]) -> Float[Tensor, "..."]:
    """`sum_l l^2 x_l - (sum_l l x_l)^2` over the first dimension, for any mass of x."""
    layers = torch.arange(probs.shape[0], dtype=probs.dtype, device=probs.device)
    layers = layers.view(-1, *([1] * (probs.ndim - 1)))
    return (layers**2 * probs).sum(0) - (layers * probs).sum(0) ** 2


@dataclass
class OriginalVariances:
    """The original's statistics, each averaged over batches."""

    exp_var_l_f: float
    exp_var_l_tf: float
    var_l: float
    rel_var_f: float
    rel_var_t: float
    batches: int
    tokens: int

    @property
    def aggregate_over_token(self) -> float:
        """`1 / rel_var_t`: the comparison as the paper states it (aggregate over token)."""
        return 1 / self.rel_var_t if self.rel_var_t != 0 else float("inf")

    def row(self, model_columns: dict[str, object]) -> dict[str, object]:
        """The original's CSV row: `model_columns` (model_name, n_layers, n_latents,
        expansion_factor, k), then step, tokens and the statistics."""
        statistics = {name: getattr(self, name) for name in STATISTICS}
        return {**model_columns, "step": self.batches - 1, "tokens": self.tokens, **statistics}


class OriginalVariancesAccumulator:
    """The original's per-batch statistics, one batch at a time."""

    def __init__(self, n_layers: int, n_latents: int) -> None:
        self.n_layers = n_layers
        self.n_latents = n_latents
        self._per_batch: list[Tensor] = []
        self.tokens = 0

    def update(self, batch: LatentBatch) -> None:
        """Add one batch: its five statistics (skipped when no position counts)."""
        values, indices = batch.topk
        if batch.mask is not None:
            mask = batch.mask.to(indices.device)
            values, indices = values[:, mask], indices[:, mask]
        else:
            values, indices = values.flatten(1, 2), indices.flatten(1, 2)
        n_tokens = indices.shape[1]
        if n_tokens == 0:
            return
        self._per_batch.append(self._statistics(values.double(), indices, n_tokens))
        self.tokens += n_tokens

    def _statistics(self, values: Tensor, indices: Tensor, n_tokens: int) -> Tensor:
        device = indices.device
        # One group per (token, latent) pair with an entry at some layer; the pairs with
        # none have p = 0 and add nothing to any sum below.
        token = torch.arange(n_tokens, device=device).view(1, -1, 1).expand_as(indices)
        keys = (token * self.n_latents + indices).flatten()
        pairs, group = torch.unique(keys, return_inverse=True)
        values = values.flatten()
        totals = torch.zeros(len(pairs), dtype=values.dtype, device=device)
        totals.index_add_(0, group, values)
        # 0 / 0 is NaN, which the original replaced by 0. A non-zero value over a zero
        # total (values of opposite signs that cancel) is counted as 0 too.
        probs = torch.where(totals[group] != 0, values / totals[group], 0.0)

        layer = torch.arange(self.n_layers, device=device).view(-1, 1, 1).expand_as(indices)
        layer = layer.flatten().to(values.dtype)
        pair_moments = torch.zeros(2, len(pairs), dtype=values.dtype, device=device)
        pair_moments[0].index_add_(0, group, layer * probs)
        pair_moments[1].index_add_(0, group, layer**2 * probs)
        pair_variance = pair_moments[1] - pair_moments[0] ** 2
        exp_var_l_tf = pair_variance.sum() / (n_tokens * self.n_latents)

        latent = (pairs % self.n_latents)[group]
        q = torch.zeros(self.n_layers * self.n_latents, dtype=values.dtype, device=device)
        q.index_add_(0, layer.long() * self.n_latents + latent, probs)
        q = q.view(self.n_layers, self.n_latents) / n_tokens
        exp_var_l_f = uncentred_variance(q).mean()
        var_l = uncentred_variance(q.mean(1))
        return torch.stack(
            [exp_var_l_f, exp_var_l_tf, var_l, exp_var_l_f / var_l, exp_var_l_tf / exp_var_l_f]
        )

    def compute(self) -> OriginalVariances:
        if not self._per_batch:
            raise ValueError("no batches were accumulated")
        means = torch.stack(self._per_batch).mean(0).tolist()
        statistics = dict(zip(STATISTICS, means, strict=True))
        return OriginalVariances(**statistics, batches=len(self._per_batch), tokens=self.tokens)


@torch.no_grad()
def collect_original_variances(
    source: LatentSource,
    batches: Iterable[dict[str, Tensor]],
    *,
    total: int | None = None,
) -> OriginalVariances:
    """The original's statistics of `source` over every batch of `batches`."""
    accumulator = OriginalVariancesAccumulator(source.n_layers, source.n_latents)
    for batch in tqdm(batches, total=total, desc="variances (original)", unit="batch"):
        accumulator.update(source.latents(batch["input_ids"]))
    return accumulator.compute()
