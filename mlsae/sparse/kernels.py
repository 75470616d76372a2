"""Triton kernels for the sparse decode of TopK latents, forward and backward.

The decode of one vector is `out = sum_i values[i] * weight[:, indices[i]]`, where
`weight` is an `nn.Linear(n_latents, n_inputs).weight` of shape `[n_inputs, n_latents]`.
Three kernels implement it and its two gradients without a dense `[vectors, n_latents]`
intermediate; `triton_decode` wraps them in an autograd function.

The kernels read the decoder through a latent-major view `weight_t = weight.T` of shape
`[n_latents, n_inputs]`: each gathered latent is a contiguous row, whose loads coalesce,
where gathering a column of an input-major layout would touch one memory sector per
element. `MLSAE` stores its decoder latent-major (`latent_major_linear`), so the view is
free and the weight gradient comes back in the parameter's layout; a plain input-major
`nn.Linear` weight is copied to latent-major once per forward.

On CUDA the kernels are compiled; on a CPU they run under Triton's interpreter when the
environment variable `TRITON_INTERPRET=1` is set before this module is imported (Triton
reads it when the kernels are defined). Importing this module fails where Triton is not
installed; `mlsae.sparse.decoder` imports it only when the "triton" kernel is used.
"""

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether the kernels were defined for Triton's CPU interpreter."""


@triton.jit
def decode_forward_kernel(
    values_ptr,
    indices_ptr,
    weight_t_ptr,
    out_ptr,
    n_inputs,
    k,
    stride_values_v,
    stride_values_k,
    stride_indices_v,
    stride_indices_k,
    stride_weight_l,
    stride_weight_n,
    stride_out_v,
    stride_out_n,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`out[v, n] = sum_i values[v, i] * weight_t[indices[v, i], n]`.

    Grid: (vectors, cdiv(n_inputs, BLOCK_N)). Each program gathers the k selected rows of
    `weight_t`, BLOCK_K at a time, over one tile of BLOCK_N inputs, accumulating in fp32.
    """
    v = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_inputs
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        idx = tl.load(
            indices_ptr + v * stride_indices_v + offs_k * stride_indices_k, mask=mask_k, other=0
        ).to(tl.int64)
        val = tl.load(
            values_ptr + v * stride_values_v + offs_k * stride_values_k, mask=mask_k, other=0.0
        ).to(tl.float32)
        rows = tl.load(
            weight_t_ptr + idx[:, None] * stride_weight_l + offs_n[None, :] * stride_weight_n,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(val[:, None] * rows, axis=0)
    tl.store(
        out_ptr + v * stride_out_v + offs_n * stride_out_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_n,
    )


@triton.jit
def decode_backward_values_kernel(
    grad_out_ptr,
    indices_ptr,
    weight_t_ptr,
    grad_values_ptr,
    n_inputs,
    k,
    stride_grad_out_v,
    stride_grad_out_n,
    stride_indices_v,
    stride_indices_k,
    stride_weight_l,
    stride_weight_n,
    stride_grad_values_v,
    stride_grad_values_k,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`grad_values[v, i] = dot(grad_out[v, :], weight_t[indices[v, i], :])`.

    Grid: (vectors, cdiv(k, BLOCK_K)). Each program computes BLOCK_K dot products, walking
    over the inputs BLOCK_N at a time, accumulating in fp32.
    """
    v = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    idx = tl.load(
        indices_ptr + v * stride_indices_v + offs_k * stride_indices_k, mask=mask_k, other=0
    ).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, n_inputs, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_inputs
        grad = tl.load(
            grad_out_ptr + v * stride_grad_out_v + offs_n * stride_grad_out_n,
            mask=mask_n,
            other=0.0,
        ).to(tl.float32)
        rows = tl.load(
            weight_t_ptr + idx[:, None] * stride_weight_l + offs_n[None, :] * stride_weight_n,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * grad[None, :], axis=1)
    tl.store(
        grad_values_ptr + v * stride_grad_values_v + offs_k * stride_grad_values_k,
        acc.to(grad_values_ptr.dtype.element_ty),
        mask=mask_k,
    )


@triton.jit
def decode_backward_weight_kernel(
    grad_out_ptr,
    rows_ptr,
    sorted_values_ptr,
    offsets_ptr,
    grad_weight_t_ptr,
    n_inputs,
    stride_grad_out_v,
    stride_grad_out_n,
    stride_grad_weight_l,
    stride_grad_weight_n,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """`grad_weight_t[j, :] = sum of values[v, i] * grad_out[v, :] over indices[v, i] == j`.

    The (vector, slot) entries are sorted by latent beforehand: the entries of latent j are
    `offsets[j]:offsets[j + 1]`, with their vector `rows` and `sorted_values`. Grid:
    (n_latents, cdiv(n_inputs, BLOCK_N)). Each program sums its latent's segment, BLOCK_E
    entries at a time, over one tile of inputs, in fp32, and writes its tile once.
    """
    j = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_inputs
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first in range(start, end, BLOCK_E):
        offs_e = first + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        row = tl.load(rows_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        val = tl.load(sorted_values_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        grad = tl.load(
            grad_out_ptr + row[:, None] * stride_grad_out_v + offs_n[None, :] * stride_grad_out_n,
            mask=mask_e[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(val[:, None] * grad, axis=0)
    tl.store(
        grad_weight_t_ptr + j * stride_grad_weight_l + offs_n * stride_grad_weight_n,
        acc.to(grad_weight_t_ptr.dtype.element_ty),
        mask=mask_n,
    )


def _block(size: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(size), 1), cap)


def _forward(values: Tensor, indices: Tensor, weight_t: Tensor) -> Tensor:
    n_vectors, k = indices.shape
    n_inputs = weight_t.shape[1]
    out = torch.empty(n_vectors, n_inputs, dtype=values.dtype, device=values.device)
    if n_vectors == 0:
        return out
    block_n = _block(n_inputs, 128)
    grid = (n_vectors, triton.cdiv(n_inputs, block_n))
    decode_forward_kernel[grid](
        values,
        indices,
        weight_t,
        out,
        n_inputs,
        k,
        *values.stride(),
        *indices.stride(),
        *weight_t.stride(),
        *out.stride(),
        BLOCK_K=_block(k, 32),
        BLOCK_N=block_n,
    )
    return out


def _backward_values(grad_out: Tensor, indices: Tensor, weight_t: Tensor, dtype) -> Tensor:
    n_vectors, k = indices.shape
    n_inputs = weight_t.shape[1]
    grad_values = torch.empty(n_vectors, k, dtype=dtype, device=grad_out.device)
    if n_vectors == 0 or k == 0:
        return grad_values
    block_k = _block(k, 32)
    grid = (n_vectors, triton.cdiv(k, block_k))
    decode_backward_values_kernel[grid](
        grad_out,
        indices,
        weight_t,
        grad_values,
        n_inputs,
        k,
        *grad_out.stride(),
        *indices.stride(),
        *weight_t.stride(),
        *grad_values.stride(),
        BLOCK_K=block_k,
        BLOCK_N=_block(n_inputs, 128),
    )
    return grad_values


def _backward_weight(
    grad_out: Tensor, values: Tensor, indices: Tensor, n_latents: int, dtype
) -> Tensor:
    """The latent-major gradient `[n_latents, n_inputs]`, by sort-then-segment-sum.

    Sorting the (vector, slot) entries by latent turns the scattered sum into one
    contiguous segment per latent, so each output tile is summed by a single program and
    written once: no atomics, no zero-initialised accumulator, a deterministic order of
    summation whatever the number of vectors choosing a latent, and a gradient written
    straight in the weight's dtype. The sort is over vectors * k entries only.
    """
    n_vectors, k = indices.shape
    n_inputs = grad_out.shape[1]
    flat = indices.reshape(-1).long()
    if flat.numel() == 0:
        return torch.zeros(n_latents, n_inputs, dtype=dtype, device=grad_out.device)
    sorted_latents, order = torch.sort(flat, stable=True)
    rows = order // k
    sorted_values = values.reshape(-1)[order]
    bounds = torch.arange(n_latents + 1, device=flat.device)
    offsets = torch.searchsorted(sorted_latents, bounds)
    grad_weight_t = torch.empty(n_latents, n_inputs, dtype=dtype, device=grad_out.device)
    block_n = _block(n_inputs, 128)
    grid = (n_latents, triton.cdiv(n_inputs, block_n))
    decode_backward_weight_kernel[grid](
        grad_out,
        rows,
        sorted_values,
        offsets,
        grad_weight_t,
        n_inputs,
        *grad_out.stride(),
        *grad_weight_t.stride(),
        BLOCK_E=32,
        BLOCK_N=block_n,
    )
    return grad_weight_t


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        weight_t = weight.t()
        if weight_t.stride(1) != 1:
            weight_t = weight_t.contiguous()
        ctx.save_for_backward(values, indices, weight_t)
        ctx.weight_dtype = weight.dtype
        return _forward(values, indices, weight_t)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, weight_t = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = _backward_values(grad_out, indices, weight_t, values.dtype)
        if ctx.needs_input_grad[2]:
            n_latents = weight_t.shape[0]
            grad_weight = _backward_weight(
                grad_out, values, indices, n_latents, ctx.weight_dtype
            ).t()
        return grad_values, None, grad_weight


def triton_decode(
    values: Float[Tensor, "vectors k"],
    indices: Int[Tensor, "vectors k"],
    weight: Float[Tensor, "n_inputs n_latents"],
) -> Float[Tensor, "vectors n_inputs"]:
    """Decode TopK latents with the Triton kernels, differentiable in `values` and `weight`.

    Accumulates in fp32; the output has the dtype of `values`, the weight gradient that of
    `weight`. Indices may be int32 or int64, and any tensor may be non-contiguous.
    """
    if not (values.is_cuda or INTERPRET):
        raise RuntimeError(
            "the Triton decode needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "mlsae.sparse.kernels is imported to run on the CPU under Triton's interpreter"
        )
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"values and indices must both be [vectors, k], got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    return _TritonDecode.apply(values, indices, weight)
