"""Sparse decode of TopK latents: ONE function, `decode`, with three kernels.

For every vector, `decode` computes `sum_i values_i * weight[:, indices_i]`, where `weight`
is an `nn.Linear(n_latents, n_inputs).weight` (`[n_inputs, n_latents]`, one column per
latent). It is differentiable in `values` and `weight`, accumulates in fp32 and returns
the dtype of `values`. Kernels:

- "triton": the Triton kernels of `mlsae.sparse.kernels` (CUDA, or the CPU interpreter).
- "embedding_bag": `torch.nn.functional.embedding_bag` over the latent-major decoder for the
  forward, and a sparse backward (below); the fast exact path on the CPU.
- "dense": the reference. Scatters the values into dense `[vectors, n_latents]` latents and
  multiplies by `weight.T`; faster only when k is a large share of n_latents.

`backend` names a kernel or a backend of `mlsae.sparse.backend` (None: the backend chosen
there for the tensors' device).
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from mlsae.sparse import native
from mlsae.sparse.backend import decode_kernel, resolve_backend, uses_native
from mlsae.sparse.gather import bag_sum
from mlsae.sparse.latent_order import LatentOrder
from mlsae.sparse.layout import latent_major
from mlsae.types import TopK


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
    Gradients flow to `topk.values` and `weight`. `backend` is a kernel ("triton",
    "embedding_bag", "dense") or a backend ("native", "fused", "sparse"), or None.
    """
    values, indices = topk
    if values.shape != indices.shape:
        raise ValueError(
            f"values and indices differ in shape: {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be [n_inputs, n_latents], got {tuple(weight.shape)}")
    n_inputs, n_latents = weight.shape
    leading, k = values.shape[:-1], values.shape[-1]
    if backend is None:
        backend = resolve_backend(values.device, k, n_latents)
    kernel = decode_kernel(backend, k, n_latents)
    n_vectors = math.prod(leading)
    values_2d, indices_2d = values.reshape(n_vectors, k), indices.reshape(n_vectors, k)
    if kernel == "triton":
        out = _triton_decode()(values_2d, indices_2d, weight)
    elif kernel == "embedding_bag" and k > 0:
        use_native = uses_native(backend, weight) and values.dtype == torch.float32
        out = _EmbeddingBagDecode.apply(values_2d, indices_2d, weight, use_native)
    else:  # "dense", and "embedding_bag" with k = 0, which embedding_bag rejects
        dense = scatter_topk(TopK(values_2d.float(), indices_2d), n_latents)
        out = (dense @ weight.t().float()).to(values.dtype)
    return out.reshape(*leading, n_inputs)


def _triton_decode():
    try:
        from mlsae.sparse.kernels import triton_decode
    except ImportError as error:
        raise ImportError(
            f"the 'triton' decode kernel needs Triton, which failed to import ({error}); use "
            "another backend, or set USE_TRITON=0"
        ) from error
    return triton_decode


class _EmbeddingBagDecode(torch.autograd.Function):
    """Decode by `embedding_bag` over the latent-major decoder, with a sparse backward.

    The forward is `bag_sum` over `weight.T` (each latent a contiguous row; `MLSAE` stores
    its decoder that way, so this is a view): the values are per-sample weights. The
    backward sorts the (vector, slot) entries by latent once and uses that order twice:
    the weight gradient is a segment sum per latent, `grad_weight.T[j] = sum of values *
    grad_out rows over the entries of latent j` (`sparse_transpose_product`), and the values
    gradient, `dot(grad_out[v], weight[:, indices[v, i]])`, is `embedding_bag`'s
    per-sample-weight backward run over the entries in latent order, so that consecutive
    dot products reuse one decoder row from the L1 cache. With `use_native`, the C kernel
    `native.sparse_backward` computes both gradients in one pass.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor, use_native: bool) -> Tensor:
        table = latent_major(weight)
        values_f = values.float()
        ctx.n_latents = weight.shape[1]
        ctx.weight_dtype = weight.dtype
        ctx.values_dtype = values.dtype
        out = bag_sum(table, indices, values_f)
        ctx.native = use_native
        keep_table = ctx.needs_input_grad[0] or ctx.native
        ctx.save_for_backward(values_f, indices, table if keep_table else None)
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, table = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        grad_values = grad_weight = None
        if ctx.native:  # both gradients in one pass over the entries
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
            return grad_values, None, grad_weight, None
        entries = LatentOrder(indices, ctx.n_latents)
        if ctx.needs_input_grad[0]:
            grad_values = entries.row_dots(grad_out, table).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = entries.segment_sums(grad_out, values).t().to(ctx.weight_dtype)
        return grad_values, None, grad_weight, None
