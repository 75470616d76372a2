"""The selections of the MLSAE's other architectures: BatchTopK and Matryoshka
(docs/variants.md).

- `topk` (the default): the k largest pre-activations of every vector.
- `batchtopk` (Bussmann et al., 2024): in training, the `k * n_vectors` largest ReLU'd
  pre-activations of a pool of vectors (the micro-batch's vectors that count, over the whole
  stack or per layer); at inference, JumpReLU with the threshold learnt in training.
- `matryoshka` (Bussmann et al., 2025; Nabeshima, 2024): the loss sums the reconstruction
  losses of nested prefixes of the latents; latents are selected by BatchTopK (default) or
  TopK.

The fast paths select a fixed number of entries per vector, so a BatchTopK selection starts
from `capacity` candidates per vector (the per-vector top-`capacity`, by `sparse.encode`)
and keeps the pool's largest among them by zeroing the others: a selection holds
`capacity` entries per vector, zeros where not kept. It is the exact BatchTopK whenever no
vector keeps all its candidates (`capped` counts those that do and might have kept more).
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.cli import ConfigError
from mlsae.types import TopK

ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
SELECTIONS = ("topk", "batchtopk")
POOLS = ("stack", "layer")
THRESHOLD_RATE = 0.01
"""The threshold's update rate: `t <- (1 - rate) t + rate m` (SAELens' `topk_threshold_lr`)."""


class Variant(NamedTuple):
    """An architecture's options, checked and resolved for `n_latents`."""

    architecture: str
    selection: str
    """How latents are selected in training: `topk` or `batchtopk`."""

    capacity: int
    """Entries per vector of a selection: k for `topk`, the candidates for `batchtopk`."""

    pool: str
    widths: tuple[int, ...]
    """Matryoshka's prefixes, increasing, the last n_latents; () for the others."""

    @property
    def batchtopk(self) -> bool:
        return self.selection == "batchtopk"


def check_variant_options(
    architecture: str,
    k: int,
    capacity: int | None,
    pool: str,
    widths: list[int] | None,
    selection: str,
) -> None:
    """Refuse unknown values, and options that do not apply to `architecture` (so that a
    model's config holds only its own), with one `ConfigError` line."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"--architecture must be one of {', '.join(ARCHITECTURES)}, not {architecture!r}"
        )
    if selection not in SELECTIONS:
        raise ConfigError(
            f"--matryoshka_selection must be one of {', '.join(SELECTIONS)}, not {selection!r}"
        )
    if pool not in POOLS:
        raise ConfigError(f"--batchtopk_pool must be one of {', '.join(POOLS)}, not {pool!r}")
    matryoshka = architecture == "matryoshka"
    if widths is not None and not matryoshka:
        raise ConfigError("--matryoshka_widths applies to --architecture matryoshka")
    if selection != "batchtopk" and not matryoshka:
        raise ConfigError("--matryoshka_selection applies to --architecture matryoshka")
    uses_batchtopk = architecture == "batchtopk" or (matryoshka and selection == "batchtopk")
    if not uses_batchtopk and (capacity is not None or pool != "stack"):
        raise ConfigError(
            "--batchtopk_capacity and --batchtopk_pool apply to --architecture batchtopk "
            "(or matryoshka with --matryoshka_selection batchtopk)"
        )
    if capacity is not None and (isinstance(capacity, bool) or capacity < k):
        raise ConfigError(f"--batchtopk_capacity must be at least k ({k}), got {capacity}")
    if matryoshka and widths is not None:
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"--matryoshka_widths must be positive integers, got {widths}")
        if any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
            raise ConfigError(f"--matryoshka_widths must increase, got {widths}")


def resolve_variant(
    architecture: str,
    k: int,
    n_latents: int,
    capacity: int | None = None,
    pool: str = "stack",
    widths: list[int] | None = None,
    selection: str = "batchtopk",
) -> Variant:
    """`check_variant_options`, then the sizes: the capacity (default `min(4 k,
    n_latents)`, at most n_latents) and the prefixes (n_latents added last if absent)."""
    check_variant_options(architecture, k, capacity, pool, widths, selection)
    if architecture == "topk":
        return Variant("topk", "topk", k, pool, ())
    selection = "batchtopk" if architecture == "batchtopk" else selection
    prefixes: tuple[int, ...] = ()
    if architecture == "matryoshka":
        prefixes = tuple(widths or ())
        if prefixes and prefixes[-1] > n_latents:
            raise ConfigError(
                f"--matryoshka_widths must not exceed n_latents ({n_latents}), got {list(prefixes)}"
            )
        if not prefixes or prefixes[-1] != n_latents:
            prefixes = (*prefixes, n_latents)
    if selection == "topk":
        return Variant(architecture, selection, k, pool, prefixes)
    if capacity is not None and capacity > n_latents:
        raise ConfigError(
            f"--batchtopk_capacity must not exceed n_latents ({n_latents}), got {capacity}"
        )
    return Variant(architecture, selection, capacity or min(4 * k, n_latents), pool, prefixes)


def pool_rows(leading_shape: torch.Size, pool: str) -> list[slice]:
    """The rows of the flattened `[vectors, ...]` selection that form each pool: one pool,
    or with `layer`, one per index of the first leading dimension (the layer of
    `[layer, batch, pos, n_inputs]` inputs) where there are two or more."""
    n_rows = leading_shape.numel()
    if pool == "stack" or len(leading_shape) < 2 or n_rows == 0:
        return [slice(0, n_rows)]
    per_layer = n_rows // leading_shape[0]
    return [slice(i * per_layer, (i + 1) * per_layer) for i in range(leading_shape[0])]


@torch.no_grad()
def batchtopk_keep(
    values: Float[Tensor, "vectors c"],
    indices: Int[Tensor, "vectors c"],
    k: int,
    counted: Bool[Tensor, " vectors"] | None,
    n_latents: int,
) -> Bool[Tensor, "vectors c"]:
    """Which entries of one pool BatchTopK keeps: the `k * n_counted` largest of the
    candidates' ReLU'd `values` over the vectors that count (`counted`, None: all), none of
    the others'. Among values equal to the cut value, the lower vector (row), then the lower
    latent index, is kept first."""
    n_rows, c = values.shape
    counted_rows = values.new_ones(n_rows, dtype=torch.bool) if counted is None else counted
    n_counted = int(counted_rows.sum())
    budget = k * n_counted
    if budget >= n_counted * c:
        return counted_rows[:, None].expand(n_rows, c).clone()
    scores = values.relu().masked_fill(~counted_rows[:, None], float("-inf"))
    cut = scores.reshape(-1).topk(budget, sorted=False).values.min()
    keep = scores > cut
    need = budget - int(keep.sum())
    tied = (scores == cut).nonzero()
    keys = tied[:, 0] * n_latents + indices[tied[:, 0], tied[:, 1]]
    chosen = tied[keys.argsort()[:need]]
    keep[chosen[:, 0], chosen[:, 1]] = True
    return keep


def batchtopk(
    candidates: TopK,
    k: int,
    mask: Bool[Tensor, "..."] | None,
    pool: str,
    n_latents: int,
) -> TopK:
    """BatchTopK over `candidates` (`[..., c]`, values before ReLU): the kept entries'
    ReLU'd values, zeros elsewhere (whose gradient is zero). `mask` (True = counts) is
    broadcast to the candidates' leading shape; vectors outside it keep nothing."""
    leading = candidates.values.shape[:-1]
    values = candidates.values.reshape(-1, candidates.values.shape[-1])
    indices = candidates.indices.reshape(values.shape)
    counted = None if mask is None else mask.expand(leading).reshape(-1)
    keep = torch.zeros_like(values, dtype=torch.bool)
    for rows in pool_rows(leading, pool):
        part = None if counted is None else counted[rows]
        keep[rows] = batchtopk_keep(values[rows], indices[rows], k, part, n_latents)
    kept = torch.relu(values) * keep
    return TopK(kept.reshape(candidates.values.shape), candidates.indices)


def jumprelu(candidates: TopK, threshold: Float[Tensor, ""]) -> TopK:
    """JumpReLU over `candidates`: every value strictly above `threshold` (compared in
    float64), zeros elsewhere."""
    keep = candidates.values.double() > threshold.double()
    return TopK(candidates.values * keep, candidates.indices)


def prefix_topk(topk: TopK, width: int) -> TopK:
    """`topk` with the entries of latents `>= width` zeroed (their gradient too)."""
    return TopK(topk.values * (topk.indices < width), topk.indices)


@torch.no_grad()
def min_positive(values: Float[Tensor, "... c"]) -> Float[Tensor, ""]:
    """The smallest positive value, as a float64 0-d tensor; +inf where none is positive."""
    values = values.double()
    if values.numel() == 0:
        return values.new_tensor(float("inf"))
    return values.masked_fill(values <= 0, float("inf")).amin()


@torch.no_grad()
def capped_vectors(
    values: Float[Tensor, "... c"], n_latents: int, mask: Bool[Tensor, "..."] | None = None
) -> tuple[Tensor, Tensor]:
    """`(capped, counted)`: how many of the vectors that count kept all their entries with
    positive values (a capacity below n_latents may have cut off more), and how many count."""
    full = (values > 0).all(-1)
    if values.shape[-1] >= n_latents:
        full = torch.zeros_like(full)
    counted = torch.ones_like(full) if mask is None else mask.expand(full.shape)
    return (full & counted).sum(), counted.sum()
