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

Only the selected latents receive gradient; nothing `[vectors, n_latents]`-sized outlives
the forward. Gradients equal those of the unfused path to float rounding (the tests check
both against dense autograd).
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.model import native
from mlsae.model.decoder import LatentOrder, _latent_major, bag_sum
from mlsae.model.encoder import bias_gradient, select_latents
from mlsae.model.types import TopK


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
) -> FusedOutput:
    """Encode `inputs - bias`, keep the k largest (and AuxK's selection among
    `dead_indices`), ReLU, and decode both selections. Differentiable in every tensor."""
    values, indices, auxk_values, auxk_indices, decoded, auxk_decoded = _FusedAutoencode.apply(
        inputs, bias, encoder_weight, decoder_weight, k, auxk, dead_indices
    )
    return FusedOutput(
        TopK(values, indices), TopK(auxk_values, auxk_indices), decoded, auxk_decoded
    )


class _FusedAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, bias, encoder_weight, decoder_weight, k, auxk, dead_indices):
        x = inputs - bias
        values, indices, auxk_values, auxk_indices = select_latents(
            x, encoder_weight, k, auxk, dead_indices
        )
        values, auxk_values = values.relu(), auxk_values.relu()
        table = _latent_major(decoder_weight)
        decoded = bag_sum(table, indices, values.float()).to(values.dtype)
        if auxk_indices.shape[1] > 0:
            auxk_decoded = bag_sum(table, auxk_indices, auxk_values.float())
            auxk_decoded = auxk_decoded.to(values.dtype)
        else:
            auxk_decoded = decoded.new_zeros(decoded.shape)
        ctx.save_for_backward(x, encoder_weight, table, values, indices, auxk_values, auxk_indices)
        ctx.dtypes = (inputs.dtype, bias.dtype, encoder_weight.dtype, decoder_weight.dtype)
        ctx.mark_non_differentiable(indices, auxk_indices)
        ctx.set_materialize_grads(False)  # no zero tensors for outputs the loss leaves unused
        return values, indices, auxk_values, auxk_indices, decoded, auxk_decoded

    @staticmethod
    def backward(ctx, grad_values, _, grad_auxk_values, __, grad_decoded, grad_auxk_decoded):
        x, encoder_weight, table, values, indices, auxk_values, auxk_indices = ctx.saved_tensors
        inputs_dtype, bias_dtype, encoder_dtype, decoder_dtype = ctx.dtypes
        n_vectors, k = indices.shape
        n_latents = encoder_weight.shape[0]
        selected = torch.cat([indices, auxk_indices], dim=1)
        all_values = torch.cat([values, auxk_values], dim=1)
        width = selected.shape[1]
        with_auxk = auxk_indices.shape[1] > 0
        if native.usable(x, table, all_values, encoder_weight):
            return _native_backward(
                ctx,
                selected,
                all_values,
                k,
                grad_values,
                grad_auxk_values,
                grad_decoded,
                grad_auxk_decoded,
            )
        # Entries that ReLU zeroed add nothing to any gradient (their values are zero and
        # so is their own gradient): the order leaves them out.
        entries = LatentOrder(selected, n_latents, keep=all_values > 0)
        if grad_decoded is None:
            grad_decoded = torch.zeros_like(x)
        # Entry (v, i) was decoded into row v of `decoded` (i < k) or of `auxk_decoded`
        # (i >= k): row v or n_vectors + v of the stacked gradients.
        if with_auxk:
            slots = entries.order - entries.vectors * width
            grad_rows = entries.vectors + n_vectors * (slots >= k)
            if grad_auxk_decoded is None:
                grad_auxk_decoded = torch.zeros_like(grad_decoded)
            grad_out = torch.cat([grad_decoded, grad_auxk_decoded]).float()
        else:
            grad_rows, grad_out = entries.vectors, grad_decoded.float()
        sorted_values = all_values.reshape(-1).index_select(0, entries.order).float()

        # d loss / d value of each kept entry, in latent order: through the decode, plus any
        # gradient that reached the returned values directly.
        grad_entries = entries.sorted_row_dots(grad_out, table, grad_rows)
        direct = _direct_gradients(grad_values, grad_auxk_values, values, auxk_values)
        if direct is not None:
            grad_entries += direct.reshape(-1).index_select(0, entries.order)

        grad_inputs = grad_bias = grad_encoder = grad_decoder = None
        if ctx.needs_input_grad[3]:
            grad_decoder = bag_sum(grad_out, grad_rows, sorted_values, entries.offsets)
            grad_decoder = grad_decoder.t().to(decoder_dtype)
        if ctx.needs_input_grad[2]:
            grad_encoder = bag_sum(x.float(), entries.vectors, grad_entries, entries.offsets)
            grad_encoder = grad_encoder.to(encoder_dtype)
        weight = encoder_weight.float()
        if ctx.needs_input_grad[0]:
            in_vector_order = grad_entries.new_zeros(selected.numel())
            in_vector_order.index_copy_(0, entries.order, grad_entries)
            grad_x = torch.nn.functional.embedding_bag(
                selected,
                weight,
                per_sample_weights=in_vector_order.view(n_vectors, width),
                mode="sum",
            )
            grad_inputs = grad_x.to(inputs_dtype)
            if ctx.needs_input_grad[1]:
                grad_bias = (-grad_x.sum(0)).to(bias_dtype)
        elif ctx.needs_input_grad[1]:
            grad_bias = bias_gradient(entries.latents, grad_entries, weight).to(bias_dtype)
        return grad_inputs, grad_bias, grad_encoder, grad_decoder, None, None, None


def _native_backward(
    ctx, selected, all_values, k, grad_values, grad_auxk_values, grad_decoded, grad_auxk_decoded
):
    """`_FusedAutoencode.backward` by `native.sparse_backward`, for fp32 CPU tensors: one
    kernel computes the entries' gradients and the decoder's and encoder's."""
    x, encoder_weight, table, values, _, auxk_values, _ = ctx.saved_tensors
    inputs_dtype, bias_dtype, encoder_dtype, decoder_dtype = ctx.dtypes
    grad_main = torch.zeros_like(x) if grad_decoded is None else grad_decoded.float()
    grad_aux = torch.zeros_like(x) if grad_auxk_decoded is None else grad_auxk_decoded.float()
    direct = _direct_gradients(grad_values, grad_auxk_values, values, auxk_values)
    needs_inputs, needs_bias, needs_encoder, needs_decoder = ctx.needs_input_grad[:4]
    dvals, grad_decoder, grad_encoder, latent_sums = native.sparse_backward(
        selected,
        all_values,
        k,
        grad_main,
        grad_aux,
        table,
        x if needs_encoder else None,
        direct,
        latent_sums=needs_bias and not needs_inputs,
    )
    grad_inputs = grad_bias = None
    if needs_inputs:
        grad_x = torch.nn.functional.embedding_bag(
            selected, encoder_weight, per_sample_weights=dvals, mode="sum"
        )
        grad_inputs = grad_x.to(inputs_dtype)
        if needs_bias:
            grad_bias = (-grad_x.sum(0)).to(bias_dtype)
    elif needs_bias:
        grad_bias = (-(latent_sums @ encoder_weight)).to(bias_dtype)
    grad_decoder = grad_decoder.t().to(decoder_dtype) if needs_decoder else None
    grad_encoder = grad_encoder.to(encoder_dtype) if needs_encoder else None
    return grad_inputs, grad_bias, grad_encoder, grad_decoder, None, None, None


def _direct_gradients(grad_values, grad_auxk_values, values, auxk_values) -> Tensor | None:
    """The gradients that reached the returned values directly (not through the decode),
    as one fp32 `[vectors, k + auxk]` tensor, or None where none did."""
    if grad_values is None and grad_auxk_values is None:
        return None
    direct = [
        torch.zeros_like(v) if g is None else g
        for g, v in ((grad_values, values), (grad_auxk_values, auxk_values))
    ]
    return torch.cat(direct, dim=1).float()
