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
from jaxtyping import Float
from torch import Tensor

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

    The forward is one `embedding_bag` (sum mode, the values as per-sample weights) over
    `weight.T` made contiguous in fp32: each latent a contiguous row. `embedding_bag`'s own
    weight gradient is much slower than the forward (it sorts and scatters through dense
    buffers), so the backward computes the weight gradient itself as a sparse-transpose
    product: the (vector, slot) entries are sorted by latent and one more `embedding_bag`
    over `grad_out` sums each latent's segment, `grad_weight.T[j] = sum of values * grad_out
    rows over the entries of latent j`. The values gradient, `dot(grad_out[v], weight[:,
    indices[v, i]])`, reuses `embedding_bag`'s per-sample-weight backward through a small
    graph recorded in the forward.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        weight_t = _latent_major(weight)
        values_f = values.float()
        ctx.n_latents = weight.shape[1]
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = values.dtype
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                ctx.values_leaf = values_f.detach().requires_grad_()
                ctx.out_graph = F.embedding_bag(
                    indices, weight_t, per_sample_weights=ctx.values_leaf, mode="sum"
                )
            out = ctx.out_graph.detach()
        else:
            out = F.embedding_bag(indices, weight_t, per_sample_weights=values_f, mode="sum")
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(values_f, indices)
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_out = grad_out.float()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            (grad_values,) = torch.autograd.grad(ctx.out_graph, ctx.values_leaf, grad_out)
            grad_values = grad_values.to(ctx.values_dtype)
            del ctx.out_graph, ctx.values_leaf
        if ctx.needs_input_grad[2]:
            values, indices = ctx.saved_tensors
            grad_weight = sparse_transpose_product(grad_out, values, indices, ctx.n_latents).t()
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_values, None, grad_weight


_LATENT_MAJOR: list[tuple[weakref.ref, int, weakref.ref]] = []


def _latent_major(weight: Tensor) -> Tensor:
    """`weight.T` as a contiguous fp32 `[n_latents, n_inputs]` tensor.

    The copy is a transpose (about 12 ms for 512 x 8,192 on two CPU cores), and a training
    step decodes twice with the same weight (top-k, then AuxK). The latest copy is
    remembered by weak references to it and to the weight, with the weight's version
    counter: a second decode of the same weight object reuses it while the first decode's
    graph still holds it (it is freed with that graph), and any in-place update of the
    weight (the optimizer's) changes the version and misses.
    """
    weight_t = weight.t()
    if weight_t.dtype == torch.float32 and weight_t.is_contiguous():
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


def sparse_transpose_product(
    grad_out: Tensor, values: Tensor, indices: Tensor, n_latents: int
) -> Tensor:
    """The latent-major `[n_latents, n_inputs]` product: row j is the sum of
    `values[v, i] * grad_out[v]` over the entries with `indices[v, i] == j`.

    The entries are sorted by latent (a stable sort, so each latent's terms are summed in
    vector order) and one `embedding_bag` sums each latent's segment. The sort runs on
    int32 keys where they fit, about twice as fast as int64 on the CPU, and the segment
    offsets come from a bincount rather than a search.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    keys = flat.int() if n_latents <= torch.iinfo(torch.int32).max else flat
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(flat, minlength=n_latents)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(
        order // k,
        grad_out,
        offsets,
        per_sample_weights=values.reshape(-1)[order],
        mode="sum",
    )
