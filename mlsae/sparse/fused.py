"""The autoencoder's sparse core as one autograd function, for the CPU.

`fused_autoencode` encodes, applies ReLU and decodes both selections (the top-k and AuxK's)
in one `torch.autograd.Function`. It computes what `topk_encode` followed by two `decode`
calls computes, but its backward visits the `k + auxk` selected entries of every vector
once, sorted by latent, leaving out those ReLU zeroed (they add nothing to any gradient;
a NaN pre-activation is left out too, so its NaN does not spread into the weights'
gradients: the loss, which `NonFiniteTracker` checks, is still NaN), and uses that one
order for all three sparse products:

- the values' gradients, `dot(grad of the decoded vector, decoder row of the latent)`;
- the decoder's gradient, one segment sum per latent over both selections at once (the
  top-k and AuxK contributions land in one `[n_latents, n_inputs]` buffer instead of two
  that autograd then adds);
- the encoder's gradient, one segment sum per latent of `grad * input`.

Where few latents are dead (at most `Tuning.dense_auxk_dead_per_slot` per AuxK slot), AuxK's
entries fill much of the dead latents' columns, and its decode and gradients are dense
matmuls over those columns instead (`[vectors, n_dead]`, small next to the top-k's
`[vectors, n_latents]` pre-activations); the sparse pass then takes the top-k alone.

Only the selected latents receive gradient; nothing `[vectors, n_latents]`-sized outlives
the forward. Gradients equal those of the unfused path to float rounding (the tests check
both against dense autograd).
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.sparse.backend import uses_native
from mlsae.sparse.encoder import select_latents
from mlsae.sparse.fused_backward import (
    Needs,
    Selection,
    dead_columns,
    scatter_columns,
    selection_gradients,
)
from mlsae.sparse.gather import bag_sum
from mlsae.sparse.layout import latent_major
from mlsae.sparse.tuning import TUNING
from mlsae.types import TopK


class FusedOutput(NamedTuple):
    """What `fused_autoencode` returns."""

    topk: TopK
    """The k largest latents of every vector, after ReLU."""

    auxk: TopK
    """AuxK's selection among the dead latents, after ReLU (possibly empty)."""

    decoded: Float[Tensor, "vectors n_inputs"]
    """`decode(topk)`, without the pre-encoder bias."""

    auxk_decoded: Float[Tensor, "vectors n_inputs"]
    """`decode(auxk)` (zeros for an empty selection)."""


def fused_autoencode(
    inputs: Float[Tensor, "vectors n_inputs"],
    bias: Float[Tensor, " n_inputs"],
    encoder_weight: Float[Tensor, "n_latents n_inputs"],
    decoder_weight: Float[Tensor, "n_inputs n_latents"],
    k: int,
    auxk: int | None,
    dead_indices: Int[Tensor, " n_dead"] | None,
    backend: str = "fused",
) -> FusedOutput:
    """Encode `inputs - bias`, keep the k largest (and AuxK's selection among
    `dead_indices`), ReLU, and decode both selections. Differentiable in every tensor. The
    `native` backend runs the C top-k and backward on fp32 tensors."""
    use_native = uses_native(backend, inputs, encoder_weight, decoder_weight)
    values, indices, auxk_values, auxk_indices, decoded, auxk_decoded = _FusedAutoencode.apply(
        inputs, bias, encoder_weight, decoder_weight, k, auxk, dead_indices, use_native
    )
    return FusedOutput(
        TopK(values, indices), TopK(auxk_values, auxk_indices), decoded, auxk_decoded
    )


def decode_selections(
    table: Float[Tensor, "n_latents n_inputs"],
    topk: TopK,
    auxk: TopK,
    dead_indices: Int[Tensor, " n_dead"] | None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The fused forward's decode of both selections from the latent-major decoder `table`:
    `(decoded, auxk_decoded, dense_auxk)`, where `dense_auxk` is `(dead_indices, columns)`
    (each AuxK entry's column among the dead latents) where AuxK was decoded by a dense
    product over the dead latents' columns (see `Tuning.dense_auxk_dead_per_slot`), else
    None."""
    values, indices = topk
    decoded = bag_sum(table, indices, values.float()).to(values.dtype)
    width = auxk.indices.shape[1]
    if 0 < width and dead_indices.numel() <= TUNING.dense_auxk_dead_per_slot * width:
        columns = dead_columns(auxk.indices, dead_indices, table.shape[0])
        dense = scatter_columns(auxk.values.float(), columns, dead_indices.numel())
        auxk_decoded = (dense @ table.index_select(0, dead_indices)).to(values.dtype)
        return decoded, auxk_decoded, (dead_indices, columns)
    if width > 0:
        auxk_decoded = bag_sum(table, auxk.indices, auxk.values.float()).to(values.dtype)
    else:
        auxk_decoded = decoded.new_zeros(decoded.shape)
    return decoded, auxk_decoded, None


class _FusedAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, bias, encoder_weight, decoder_weight, k, auxk, dead_indices, native):
        x = inputs - bias
        values, indices, auxk_values, auxk_indices = select_latents(
            x, encoder_weight, k, auxk, dead_indices, native
        )
        ctx.native = native
        values, auxk_values = values.relu(), auxk_values.relu()
        table = latent_major(decoder_weight)
        decoded, auxk_decoded, ctx.dense_auxk = decode_selections(
            table, TopK(values, indices), TopK(auxk_values, auxk_indices), dead_indices
        )
        ctx.save_for_backward(x, encoder_weight, table, values, indices, auxk_values, auxk_indices)
        ctx.dtypes = (inputs.dtype, bias.dtype, encoder_weight.dtype, decoder_weight.dtype)
        ctx.mark_non_differentiable(indices, auxk_indices)
        ctx.set_materialize_grads(False)  # no zero tensors for outputs the loss leaves unused
        return values, indices, auxk_values, auxk_indices, decoded, auxk_decoded

    @staticmethod
    def backward(ctx, grad_values, _, grad_auxk_values, __, grad_decoded, grad_auxk_decoded):
        x, encoder_weight, table, values, indices, auxk_values, auxk_indices = ctx.saved_tensors
        inputs_dtype, bias_dtype, encoder_dtype, decoder_dtype = ctx.dtypes
        needs = Needs(*ctx.needs_input_grad[:4])
        grads = selection_gradients(
            needs,
            Selection(x, encoder_weight, table, values, indices, auxk_values, auxk_indices),
            ctx.dense_auxk,
            ctx.native,
            grad_values,
            grad_auxk_values,
            grad_decoded,
            grad_auxk_decoded,
        )
        grad_x, grad_bias, grad_encoder, grad_decoder = grads
        grad_inputs = grad_x.to(inputs_dtype) if needs.inputs else None
        if needs.bias:
            grad_bias = (-grad_x.sum(0) if needs.inputs else grad_bias).to(bias_dtype)
        grad_encoder = grad_encoder.to(encoder_dtype) if needs.encoder else None
        grad_decoder = grad_decoder.t().to(decoder_dtype) if needs.decoder else None
        return grad_inputs, grad_bias, grad_encoder, grad_decoder, None, None, None, None
