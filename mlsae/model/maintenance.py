"""Decoder maintenance after each backward: unit-norm columns, and gradients without the
component along their column (Gao et al., 2024)."""

import torch
from torch import nn

from mlsae.sparse import columnwise_dot


@torch.no_grad()
def unit_norm_decoder(decoder: nn.Linear) -> None:
    """Scale every decoder column (one per latent) to unit norm, in place."""
    decoder.weight.div_(decoder.weight.norm(dim=0, keepdim=True))


@torch.no_grad()
def unit_norm_decoder_gradient(decoder: nn.Linear) -> None:
    """Remove from each column's gradient its component along that column.

    Assumes unit-norm columns (call `unit_norm_decoder` first).
    """
    weight, grad = decoder.weight, decoder.weight.grad
    if grad is None:
        raise ValueError("the decoder has no gradient: call this after backward")
    parallel = (grad * weight).sum(dim=0, keepdim=True)
    grad.sub_(parallel * weight)


@torch.no_grad()
def maintain_decoder(decoder: nn.Linear) -> None:
    """`unit_norm_decoder` then `unit_norm_decoder_gradient`, fused: four passes over the
    decoder (column norms, the division, the gradient's components along the columns, its
    update) with no `[n_inputs, n_latents]` temporaries. Equal to the two functions to
    float rounding."""
    weight, grad = decoder.weight, decoder.weight.grad
    if grad is None:
        raise ValueError("the decoder has no gradient: call this after backward")
    weight.div_(torch.linalg.vector_norm(weight, dim=0))
    grad.addcmul_(weight, columnwise_dot(grad, weight), value=-1)
