"""The TopK encoder: one matmul, the k largest pre-activations, and AuxK's selection.

`topk_encode` is an autograd function whose backward touches only the selected
latents: the dense `[vectors, n_latents]` pre-activations live only inside the
forward, and the gradients for the input and the encoder weight are gathered and
scattered through the selected rows of the weight.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.model.decoder import sparse_transpose_product
from mlsae.model.types import TopK


def _empty_selection(n_vectors: int, like: Tensor) -> tuple[Tensor, Tensor]:
    values = like.new_empty((n_vectors, 0))
    indices = torch.empty((n_vectors, 0), dtype=torch.long, device=like.device)
    return values, indices


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, k, auxk, dead_indices):
        pre_activations = F.linear(inputs, weight)
        values, indices = pre_activations.topk(k, dim=-1, sorted=False)
        if auxk and dead_indices is not None and dead_indices.numel() > 0:
            dead_pre_activations = pre_activations.index_select(-1, dead_indices)
            n_auxk = min(auxk, dead_indices.numel())
            auxk_values, positions = dead_pre_activations.topk(n_auxk, dim=-1, sorted=False)
            auxk_indices = dead_indices[positions]
        else:
            auxk_values, auxk_indices = _empty_selection(inputs.shape[0], values)
        ctx.save_for_backward(inputs, weight, indices, auxk_indices)
        ctx.mark_non_differentiable(indices, auxk_indices)
        return values, indices, auxk_values, auxk_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_auxk_values, _grad_auxk_indices):
        inputs, weight, indices, auxk_indices = ctx.saved_tensors
        selected = torch.cat([indices, auxk_indices], dim=-1)
        # Accumulate in fp32 at least (fp64 stays fp64).
        compute = torch.promote_types(weight.dtype, torch.float32)
        grads = torch.cat([grad_values, grad_auxk_values], dim=-1).to(compute)
        grad_inputs = grad_weight = None
        if ctx.needs_input_grad[0]:
            # grad_inputs[v] = sum_i grads[v, i] * weight[selected[v, i]]
            grad_inputs = F.embedding_bag(
                selected, weight.to(compute), per_sample_weights=grads, mode="sum"
            ).to(inputs.dtype)
        if ctx.needs_input_grad[1]:
            # grad_weight[j] = sum over (v, i) with selected[v, i] == j of grads[v, i] * inputs[v]
            grad_weight = sparse_transpose_product(
                inputs.to(compute), grads, selected, weight.shape[0]
            ).to(weight.dtype)
        return grad_inputs, grad_weight, None, None, None


def topk_encode(
    inputs: Float[Tensor, "vectors n_inputs"],
    weight: Float[Tensor, "n_latents n_inputs"],
    k: int,
    auxk: int | None = None,
    dead_indices: Int[Tensor, " n_dead"] | None = None,
) -> tuple[TopK, TopK]:
    """The k largest pre-activations of `inputs @ weight.T`, and AuxK's selection.

    Returns `(topk, auxk)`, values before ReLU. `auxk` holds the `min(auxk,
    n_dead)` largest pre-activations among the latents in `dead_indices` (an
    empty selection when there are none). Gradients reach `inputs` and `weight`
    only through the selected latents.
    """
    values, indices, auxk_values, auxk_indices = _TopKEncode.apply(
        inputs, weight, k, auxk, dead_indices
    )
    return TopK(values, indices), TopK(auxk_values, auxk_indices)
