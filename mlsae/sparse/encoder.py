"""The sparse TopK encoder: one matmul, the k largest pre-activations, and AuxK's selection.

`topk_encode` is an autograd function whose backward touches only the selected
latents: the dense `[vectors, n_latents]` pre-activations live only inside the
forward, and the gradients for the input and the encoder weight are gathered and
scattered through the selected rows of the weight.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.sparse.backend import uses_native
from mlsae.sparse.latent_order import sparse_transpose_product
from mlsae.sparse.topk import fast_topk
from mlsae.sparse.tuning import TUNING
from mlsae.types import TopK


def _empty_selection(n_vectors: int, like: Tensor) -> tuple[Tensor, Tensor]:
    values = like.new_empty((n_vectors, 0))
    indices = torch.empty((n_vectors, 0), dtype=torch.long, device=like.device)
    return values, indices


def encode_chunks(n_vectors: int, row_bytes: int, device: torch.device) -> list[slice]:
    """Row ranges of near-equal size whose pre-activations take at most
    `Tuning.encode_chunk_bytes` each, or `Tuning.min_encode_chunk_rows` rows where those
    take more (one range off the CPU)."""
    if device.type != "cpu":
        return [slice(0, n_vectors)]
    rows_per_chunk = max(1, TUNING.min_encode_chunk_rows, TUNING.encode_chunk_bytes // row_bytes)
    n_chunks = max(1, -(-n_vectors // rows_per_chunk))
    bounds = [n_vectors * i // n_chunks for i in range(n_chunks + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _join(parts: list[Tensor | None]) -> Tensor | None:
    return parts[0] if len(parts) == 1 or parts[0] is None else torch.cat(parts)


def select_latents(
    x: Float[Tensor, "vectors n_inputs"],
    weight: Float[Tensor, "n_latents n_inputs"],
    k: int,
    auxk: int | None,
    dead_indices: Int[Tensor, " n_dead"] | None,
    use_native: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The encoder's forward without autograd: the k largest pre-activations of `x @
    weight.T` and AuxK's `min(auxk, n_dead)` largest among `dead_indices`, as `(values,
    indices, auxk_values, auxk_indices)`, with the C top-k where `use_native`. On the CPU
    the dense pre-activations exist only a chunk of rows at a time
    (`Tuning.encode_chunk_bytes`); the BLAS may round a chunk's matmul differently from
    the whole one's in the last bit (chunks of 64 rows or more have matched bit for
    bit)."""
    n_latents = weight.shape[0]
    with_auxk = bool(auxk) and dead_indices is not None and dead_indices.numel() > 0
    n_dead = dead_indices.numel() if with_auxk else 0
    # AuxK's top-k runs over the dead latents' pre-activations. Where there are many, the
    # encoder's rows are reordered dead-last (a stable sort of the dead flags, so no host
    # sync) so that those pre-activations are a contiguous slice of every row; where
    # gathering their columns moves less memory than copying the weight, they are gathered.
    order = dead_order = None
    if 0 < n_dead < n_latents and n_dead * x.shape[0] > weight.numel():
        is_dead = torch.zeros(n_latents, dtype=torch.int8, device=weight.device)
        is_dead[dead_indices] = 1
        order = torch.argsort(is_dead, stable=True)
        weight = weight.index_select(0, order)
        dead_order = order[n_latents - n_dead :]
    elif n_dead == n_latents:
        dead_order = torch.arange(n_latents, device=weight.device)
    elif with_auxk:
        dead_order = dead_indices

    row_bytes = n_latents * x.element_size()
    chunks = encode_chunks(x.shape[0], row_bytes, x.device)
    buffer = None  # one allocation (and one round of page faults) for all chunks
    if len(chunks) > 1 and x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type):
        buffer = x.new_empty((max(c.stop - c.start for c in chunks), n_latents))

    def search(rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if buffer is None:
            pre_activations = F.linear(rows, weight)
        else:
            pre_activations = torch.mm(rows, weight.t(), out=buffer[: rows.shape[0]])
        values, indices = fast_topk(pre_activations, k, use_native)
        if not with_auxk:
            return (values, indices, *_empty_selection(rows.shape[0], values))
        if order is not None:
            dead_pre_activations = pre_activations[:, n_latents - n_dead :]
        elif n_dead == n_latents:
            dead_pre_activations = pre_activations
        else:
            dead_pre_activations = pre_activations.index_select(1, dead_indices)
        if auxk >= n_dead:  # AuxK takes every dead latent: no top-k to run
            # a copy: the next chunk overwrites the buffer
            auxk_values = dead_pre_activations.clone(memory_format=torch.contiguous_format)
            positions = None
        else:
            auxk_values, positions = fast_topk(dead_pre_activations, auxk, use_native)
        return values, indices, auxk_values, positions

    parts = [search(x[rows]) for rows in chunks]
    values, indices, auxk_values, positions = (_join([p[i] for p in parts]) for i in range(4))
    if order is not None:
        indices = order[indices]
    if not with_auxk:
        auxk_indices = positions
    elif auxk >= n_dead:
        auxk_indices = dead_order.expand(x.shape[0], n_dead).contiguous()
    else:
        auxk_indices = dead_order[positions]
    return values, indices, auxk_values, auxk_indices


def bias_gradient(
    latents: Int[Tensor, " entries"],
    grads: Float[Tensor, " entries"],
    weight: Float[Tensor, "n_latents n_inputs"],
) -> Float[Tensor, " n_inputs"]:
    """The pre-encoder bias's gradient when the inputs need none: minus the sum over
    vectors of `sum_i grads[v, i] * weight[selected[v, i]]`, computed as the gradients
    summed per latent, then one vector-matrix product with the weight. The entries
    (`latents[e]`, `grads[e]`) may come in any order."""
    per_latent = grads.new_zeros(weight.shape[0])
    per_latent.index_add_(0, latents, grads)
    return -(per_latent @ weight)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, bias, weight, k, auxk, dead_indices, use_native):
        x = inputs if bias is None else inputs - bias
        ctx.bias_dtype = None if bias is None else bias.dtype
        values, indices, auxk_values, auxk_indices = select_latents(
            x, weight, k, auxk, dead_indices, use_native
        )
        ctx.save_for_backward(x, weight, indices, auxk_indices)
        ctx.mark_non_differentiable(indices, auxk_indices)
        return values, indices, auxk_values, auxk_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_auxk_values, _grad_auxk_indices):
        x, weight, indices, auxk_indices = ctx.saved_tensors
        selected = torch.cat([indices, auxk_indices], dim=-1)
        # Accumulate in fp32 at least (fp64 stays fp64).
        compute = torch.promote_types(weight.dtype, torch.float32)
        grads = torch.cat([grad_values, grad_auxk_values], dim=-1).to(compute)
        grad_inputs = grad_bias = grad_weight = None
        if ctx.needs_input_grad[0]:
            # grad_inputs[v] = sum_i grads[v, i] * weight[selected[v, i]]
            grad_x = F.embedding_bag(
                selected, weight.to(compute), per_sample_weights=grads, mode="sum"
            )
            grad_inputs = grad_x.to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_bias = -grad_x.sum(0)
        elif ctx.needs_input_grad[1]:
            grad_bias = bias_gradient(selected.reshape(-1), grads.reshape(-1), weight.to(compute))
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        if ctx.needs_input_grad[2]:
            # grad_weight[j] = sum over (v, i) with selected[v, i] == j of grads[v, i] * x[v]
            grad_weight = sparse_transpose_product(
                x.to(compute), grads, selected, weight.shape[0]
            ).to(weight.dtype)
        return grad_inputs, grad_bias, grad_weight, None, None, None, None


def topk_encode(
    inputs: Float[Tensor, "vectors n_inputs"],
    weight: Float[Tensor, "n_latents n_inputs"],
    k: int,
    auxk: int | None = None,
    dead_indices: Int[Tensor, " n_dead"] | None = None,
    bias: Float[Tensor, " n_inputs"] | None = None,
    backend: str = "sparse",
) -> tuple[TopK, TopK]:
    """The k largest pre-activations of `(inputs - bias) @ weight.T`, and AuxK's selection.

    Returns `(topk, auxk)`, values before ReLU. `auxk` holds the `min(auxk,
    n_dead)` largest pre-activations among the latents in `dead_indices` (unique;
    an empty selection when there are none). Gradients reach `inputs`, `bias` and
    `weight` only through the selected latents; with `inputs` not requiring
    gradients, the bias gradient costs one vector-matrix product. The `native` backend
    selects with the C top-k.
    """
    use_native = uses_native(backend, inputs, weight)
    values, indices, auxk_values, auxk_indices = _TopKEncode.apply(
        inputs, bias, weight, k, auxk, dead_indices, use_native
    )
    return TopK(values, indices), TopK(auxk_values, auxk_indices)
