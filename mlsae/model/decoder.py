"""Sparse decode of TopK latents: ONE function, `decode`, dispatching to a backend.

For every vector, `decode` computes `sum_i values_i * weight[:, indices_i]`, where `weight`
is an `nn.Linear(n_latents, n_inputs).weight` (`[n_inputs, n_latents]`, one column per
latent). It is differentiable in `values` and `weight`, accumulates in fp32 and returns
the dtype of `values`. Backends:

- "triton": the Triton kernels of `mlsae.model.kernels` (CUDA, or the CPU interpreter).
- "embedding_bag": `torch.nn.functional.embedding_bag` over the latent-major decoder for the
  forward, and a custom backward (below); the fast exact path on the CPU.
- "dense": the reference. Scatters the values into dense `[vectors, n_latents]` latents and
  multiplies by `weight.T`; the only backend that materialises dense latents, faster only
  when k is a large share of n_latents.

With `backend=None`, CUDA tensors use "triton" where Triton imports and the environment
variable `USE_TRITON` is not "0"; otherwise "embedding_bag" when k is small next to
n_latents, else "dense".
"""

import functools
import importlib
import logging
import math
import os
import weakref

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.model import native
from mlsae.model.types import TopK

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "embedding_bag", "dense")

DENSE_MIN_K_SHARE = 1 / 16
"""Automatic selection decodes densely from `k >= DENSE_MIN_K_SHARE * n_latents`.

Measured forward + backward on a CPU (fp32, 512 inputs, 1,024 vectors, 4,096 latents, one
thread): "embedding_bag" takes 0.53x the time of "dense" at k = 1/32 of the latents, 0.89x
at 1/16, 1.6x at 1/8 and 3.3x at 1/4. Both scale linearly in vectors and inputs, so the
crossover is a share of the latents. See `bench/decode.py`."""


def scatter_topk(topk: TopK, n_latents: int) -> Float[Tensor, "... n_latents"]:
    """Dense latents: each vector's values at their latent indices, zeros elsewhere.

    Values that share an index within a vector are summed (scatter-add), so that decoding
    the dense latents equals `decode(topk, ...)`. A TopK result never repeats an index
    within a vector. Differentiable in `topk.values`.
    """
    values, indices = topk
    dense = values.new_zeros(*values.shape[:-1], n_latents)
    return dense.scatter_add(-1, indices.long(), values)


def decode(
    topk: TopK,
    weight: Float[Tensor, "n_inputs n_latents"],
    backend: str | None = None,
) -> Float[Tensor, "... n_inputs"]:
    """`sum_i values_i * weight[:, indices_i]` for every vector of `topk`.

    `topk.values` and `topk.indices` are `[..., k]` (indices int32 or int64); the output is
    `[..., n_inputs]` in the dtype of `topk.values`, accumulated in fp32. No bias is added.
    Gradients flow to `topk.values` and `weight`. `backend` is one of `BACKENDS`, or None
    to choose one (see the module docstring).
    """
    values, indices = topk
    if values.shape != indices.shape:
        raise ValueError(
            f"values and indices differ in shape: {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be [n_inputs, n_latents], got {tuple(weight.shape)}")
    if backend is None:
        backend = choose_backend(values.device, values.shape[-1], weight.shape[1])
    elif backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}: choose one of {BACKENDS}")

    n_inputs, n_latents = weight.shape
    leading, k = values.shape[:-1], values.shape[-1]
    n_vectors = math.prod(leading)
    values_2d, indices_2d = values.reshape(n_vectors, k), indices.reshape(n_vectors, k)
    if backend == "triton":
        out = _load_kernels().triton_decode(values_2d, indices_2d, weight)
    elif backend == "embedding_bag" and k > 0:
        out = _EmbeddingBagDecode.apply(values_2d, indices_2d, weight)
    else:  # "dense", and "embedding_bag" with k = 0, which embedding_bag rejects
        dense = scatter_topk(TopK(values_2d.float(), indices_2d), n_latents)
        out = (dense @ weight.t().float()).to(values.dtype)
    return out.reshape(*leading, n_inputs)


def choose_backend(device: torch.device, k: int, n_latents: int) -> str:
    """The backend `decode` uses with `backend=None` for k of n_latents on `device`."""
    if device.type == "cuda" and os.environ.get("USE_TRITON", "1") != "0" and _triton_available():
        backend = "triton"
    elif k < DENSE_MIN_K_SHARE * n_latents:
        backend = "embedding_bag"
    else:
        backend = "dense"
    _log_choice(backend, device.type)
    return backend


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    logger.debug("decoding %s tensors with the %r backend", device_type, backend)


@functools.cache
def _triton_available() -> bool:
    try:
        _load_kernels()
    except Exception as error:  # a broken install can fail with more than ImportError
        logger.debug("Triton unavailable: %s", error)
        return False
    return True


def _load_kernels():
    try:
        kernels = importlib.import_module("mlsae.model.kernels")
    except ImportError as error:
        raise ImportError(
            f"the 'triton' decode backend needs Triton, which failed to import ({error}); "
            f"use backend='embedding_bag' or 'dense', or set USE_TRITON=0"
        ) from error
    return kernels


class _EmbeddingBagDecode(torch.autograd.Function):
    """Decode by `embedding_bag` over the latent-major decoder, with a sparse backward.

    The forward is `bag_sum` over `weight.T` (each latent a contiguous row; `MLSAE` stores
    its decoder that way, so this is a view): the values are per-sample weights. The
    backward sorts the (vector, slot) entries by latent once and uses that order twice:
    the weight gradient is a segment sum per latent, `grad_weight.T[j] = sum of values *
    grad_out rows over the entries of latent j` (`sparse_transpose_product`), and the values
    gradient, `dot(grad_out[v], weight[:, indices[v, i]])`, is `embedding_bag`'s
    per-sample-weight backward run over the entries in latent order, so that consecutive
    dot products reuse one decoder row from the L1 cache. For fp32 CPU tensors, where the C
    kernels are compiled, `native.sparse_backward` computes both gradients in one pass.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        table = _latent_major(weight)
        values_f = values.float()
        ctx.n_latents = weight.shape[1]
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = values.dtype
        out = bag_sum(table, indices, values_f)
        ctx.native = native.usable(values_f, table)
        keep_table = ctx.needs_input_grad[0] or ctx.native
        ctx.save_for_backward(values_f, indices, table if keep_table else None)
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, table = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        grad_values = grad_weight = None
        if ctx.native:  # both gradients in one pass over the entries (`mlsae.model.native`)
            dvals, grad_table, _, _ = native.sparse_backward(
                indices,
                values,
                indices.shape[1],
                grad_out,
                None,
                table,
                None,
                skip_nonpositive=False,
            )
            if ctx.needs_input_grad[0]:
                grad_values = dvals.to(ctx.values_dtype)
            if ctx.needs_input_grad[2]:
                grad_weight = grad_table.t().to(ctx.weight_dtype)
            return grad_values, None, grad_weight
        entries = LatentOrder(indices, ctx.n_latents)
        if ctx.needs_input_grad[0]:
            grad_values = entries.row_dots(grad_out, table).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = entries.segment_sums(grad_out, values).t().to(ctx.weight_dtype)
        return grad_values, None, grad_weight


_LATENT_MAJOR: list[tuple[weakref.ref, int, weakref.ref]] = []


def _latent_major(weight: Tensor) -> Tensor:
    """`weight.T` as an fp32 `[n_latents, n_inputs]` tensor with contiguous rows.

    For a latent-major fp32 weight (how `MLSAE` stores its decoder) this is a view. Any
    other weight is copied (a transpose: about 12 ms for 512 x 8,192 on two CPU cores),
    and a training step decodes twice with the same weight (top-k, then AuxK), so the
    latest copy is remembered by weak references to it and to the weight, with the
    weight's version counter: a second decode of the same weight object reuses it while
    the first decode's graph still holds it, and any in-place update of the weight (the
    optimizer's) changes the version and misses.
    """
    weight_t = weight.t()
    if weight_t.dtype == torch.float32 and weight_t.stride(-1) == 1:
        return weight_t
    if _LATENT_MAJOR:
        weight_ref, version, copy_ref = _LATENT_MAJOR[0]
        cached = copy_ref()
        if cached is not None and weight_ref() is weight and version == weight._version:
            return cached
    latent_major = torch.empty(weight_t.shape, dtype=torch.float32, device=weight.device)
    latent_major.copy_(weight_t)
    _LATENT_MAJOR[:] = [(weakref.ref(weight), weight._version, weakref.ref(latent_major))]
    return latent_major


CACHE_BUDGET_BYTES = 1 << 20
"""`bag_sum` cuts its table into column slices of at most this many bytes (half a
core's L2 cache on the machine measured), so that rows gathered again stay cached."""

MIN_COLUMN_CHUNK = 64
"""The narrowest slice `bag_sum` uses: narrower ones cost more in calls than they save."""


def column_chunk(
    n_columns: int, n_rows: int, n_entries: int, n_bags: int, itemsize: int = 4
) -> int:
    """The width of the column slices `bag_sum` gathers `n_entries` rows of an `[n_rows,
    n_columns]` table into `n_bags` sums in.

    A gather from a table larger than the cache fetches every row from memory; one slice of
    the columns at a time is small enough to stay in the cache, so a row used by several
    entries is fetched once per slice. Slicing pays only where rows are reused (at least 4
    entries per row on average) and the gathers outweigh writing the output (at least 4
    entries per bag: each slice's output is a fresh tensor, copied into place). The width
    is the largest power of two from `MIN_COLUMN_CHUNK` whose slice fits
    `CACHE_BUDGET_BYTES`. Measured on two CPU cores (fp32, 512 columns): 3,072 bags of 256
    entries from 8,192 rows take 40 ms unsliced and 12 ms in slices of 64 columns.
    """
    if n_entries < 4 * n_rows or n_entries < 4 * n_bags:
        return n_columns
    chunk = MIN_COLUMN_CHUNK
    while chunk * 2 <= n_columns and n_rows * chunk * 2 * itemsize <= CACHE_BUDGET_BYTES:
        chunk *= 2
    return min(chunk, n_columns)


def bag_sum(
    table: Float[Tensor, "rows columns"],
    indices: Tensor,
    per_sample_weights: Tensor,
    offsets: Tensor | None = None,
) -> Float[Tensor, "bags columns"]:
    """`F.embedding_bag(indices, table, offsets, per_sample_weights=..., mode="sum")`,
    gathered in column slices of `column_chunk` width where that keeps rows cached.

    The table may be any tensor with unit column stride (a slice of a wider tensor, or the
    transpose of a column-major one). Each output column sums the same terms in the same
    order as one `embedding_bag` over the whole table, so the result is identical to it.
    """
    n_rows, n_columns = table.shape
    n_bags = indices.shape[0] if offsets is None else offsets.shape[0]
    chunk = column_chunk(n_columns, n_rows, indices.numel(), n_bags, table.element_size())
    if chunk >= n_columns or table.device.type != "cpu":
        return F.embedding_bag(
            indices, table, offsets, per_sample_weights=per_sample_weights, mode="sum"
        )
    out = table.new_empty((n_bags, n_columns))
    for start in range(0, n_columns, chunk):
        columns = slice(start, start + chunk)
        out[:, columns] = F.embedding_bag(
            indices, table[:, columns], offsets, per_sample_weights=per_sample_weights, mode="sum"
        )
    return out


class LatentOrder:
    """The entries of `[vectors, k]` latent indices sorted by latent, for the sparse
    backward passes that visit them latent by latent; with `keep`, only the entries it
    marks (a host sync, for their count).

    The sort is stable (each latent's entries stay in vector order) and runs on the
    narrowest integer keys that hold the latents: on two CPU cores, 786,432 keys sort in
    21 ms as int64, 11 ms as int32 and 4 ms as int16. The segment offsets come from a
    bincount rather than a search.
    """

    def __init__(
        self,
        indices: Int[Tensor, "vectors k"],
        n_latents: int,
        keep: Bool[Tensor, "vectors k"] | None = None,
    ) -> None:
        self.n_vectors, self.k = indices.shape
        self.n_latents = n_latents
        flat = indices.reshape(-1)
        keys = _narrow_keys(flat, n_latents)
        if keep is None:
            counts = torch.bincount(flat, minlength=n_latents)
        else:
            # Dropped entries count under a latent past the end and sort first, as -1.
            dropped = ~keep.reshape(-1)
            keys = keys.masked_fill(dropped, -1)
            counts = torch.bincount(flat.masked_fill(dropped, n_latents), minlength=n_latents + 1)
        n_dropped = 0 if keep is None else int(counts[n_latents])
        counts = counts[:n_latents]
        self.order = torch.sort(keys, stable=True).indices[n_dropped:]
        self.vectors = self.order // max(self.k, 1)
        self.latents = flat.index_select(0, self.order)
        self.offsets = counts.cumsum(0) - counts

    def segment_sums(
        self, rows: Float[Tensor, "vectors d"], weights: Float[Tensor, "vectors k"]
    ) -> Float[Tensor, "n_latents d"]:
        """Row j: the sum of `weights[v, i] * rows[v]` over the entries of latent j."""
        sorted_weights = weights.reshape(-1).index_select(0, self.order)
        return bag_sum(rows, self.vectors, sorted_weights, self.offsets)

    def sorted_row_dots(
        self,
        rows: Float[Tensor, "n_rows d"],
        table: Float[Tensor, "n_latents d"],
        row_of_entry: Int[Tensor, " entries"],
    ) -> Float[Tensor, " entries"]:
        """For every entry in latent order: `dot(rows[row_of_entry], table[latent])`.

        Consecutive entries share a latent, so its table row stays in the L1 cache. This is
        `embedding_bag`'s per-sample-weight backward, with the entries' rows as bags."""
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows, table, self.latents, self.offsets, row_of_entry, 0
        )

    def row_dots(
        self, rows: Float[Tensor, "vectors d"], table: Float[Tensor, "n_latents d"]
    ) -> Float[Tensor, "vectors k"]:
        """Entry (v, i): `dot(rows[v], table[indices[v, i]])`, computed in latent order
        (zero for dropped entries)."""
        dots = self.sorted_row_dots(rows, table, self.vectors)
        out = dots.new_zeros(self.n_vectors * self.k)
        out.index_copy_(0, self.order, dots)
        return out.view(self.n_vectors, self.k)


def _narrow_keys(indices: Tensor, n_latents: int) -> Tensor:
    for dtype in (torch.int16, torch.int32):
        if n_latents - 1 <= torch.iinfo(dtype).max:
            return indices.to(dtype)
    return indices


def sparse_transpose_product(
    grad_out: Float[Tensor, "vectors d"],
    values: Float[Tensor, "vectors k"],
    indices: Int[Tensor, "vectors k"],
    n_latents: int,
) -> Float[Tensor, "n_latents d"]:
    """The latent-major `[n_latents, d]` product: row j is the sum of `values[v, i] *
    grad_out[v]` over the entries with `indices[v, i] == j` (see `LatentOrder`)."""
    return LatentOrder(indices, n_latents).segment_sums(grad_out, values)
