"""The backward of the fused autoencoder (`mlsae.sparse.fused`): gradients from the
selected entries only, by torch operations or the C kernel, and AuxK's as dense products
over the dead latents' columns where few are dead."""

from typing import NamedTuple

import torch
from torch import Tensor

from mlsae.sparse import native
from mlsae.sparse.backend import uses_native
from mlsae.sparse.encoder import bias_gradient
from mlsae.sparse.gather import bag_sum
from mlsae.sparse.latent_order import LatentOrder


class Needs(NamedTuple):
    """Which of the fused function's tensors need a gradient."""

    inputs: bool
    bias: bool
    encoder: bool
    decoder: bool


class Selection(NamedTuple):
    """What the backward passes read: the encoded vectors, the weights and the selection."""

    x: Tensor
    encoder_weight: Tensor
    table: Tensor
    values: Tensor | None
    indices: Tensor | None
    auxk_values: Tensor
    auxk_indices: Tensor
    """Latent indices, or for the dense AuxK pass, columns among the dead latents."""


class Gradients(NamedTuple):
    """Gradients in fp32: the encoded vectors' (the inputs'; None unless needed), the
    bias's where the inputs need none (else None), the encoder's and the latent-major
    decoder's (None unless needed)."""

    x: Tensor | None
    bias: Tensor | None
    encoder: Tensor | None
    decoder: Tensor | None


def selection_gradients(
    needs: Needs,
    selection: Selection,
    dense_auxk: tuple[Tensor, Tensor] | None,
    use_native: bool,
    grad_values: Tensor | None,
    grad_auxk_values: Tensor | None,
    grad_decoded: Tensor | None,
    grad_auxk_decoded: Tensor | None,
) -> Gradients:
    """The fused backward's gradients from both selections, given the forward's
    `dense_auxk` (see `decode_selections`): one sparse pass over the top-k and, unless AuxK
    was decoded densely, AuxK's entries (by the C kernel where `use_native`); then the
    dense AuxK products where it was."""
    x, encoder_weight, table, values, indices, auxk_values, auxk_indices = selection
    sparse_aux = (auxk_values, auxk_indices, grad_auxk_values, grad_auxk_decoded)
    if dense_auxk is not None:  # the sparse pass takes the top-k alone
        sparse_aux = (auxk_values[:, :0], auxk_indices[:, :0], None, None)
    use_native = use_native and uses_native("native", x, table, values, encoder_weight)
    sparse = native_sparse_gradients if use_native else torch_sparse_gradients
    sparse_values, sparse_indices, sparse_grad_values, sparse_grad_decoded = sparse_aux
    grads = sparse(
        needs,
        Selection(x, encoder_weight, table, values, indices, sparse_values, sparse_indices),
        grad_values,
        sparse_grad_values,
        grad_decoded,
        sparse_grad_decoded,
    )
    if dense_auxk is not None and (grad_auxk_decoded is not None or grad_auxk_values is not None):
        dead_indices, columns = dense_auxk
        grads = add_dense_auxk_gradients(
            needs,
            grads,
            Selection(x, encoder_weight, table, None, None, auxk_values, columns),
            dead_indices,
            grad_auxk_decoded,
            grad_auxk_values,
        )
    return grads


def dead_columns(auxk_indices: Tensor, dead_indices: Tensor, n_latents: int) -> Tensor:
    """Each AuxK entry's column among `dead_indices` (unique latents)."""
    column_of = torch.zeros(n_latents, dtype=torch.long, device=dead_indices.device)
    column_of[dead_indices] = torch.arange(dead_indices.numel(), device=dead_indices.device)
    return column_of[auxk_indices]


def scatter_columns(values: Tensor, columns: Tensor, n_columns: int) -> Tensor:
    """`[vectors, n_columns]` zeros with each vector's `values` at its `columns`."""
    return values.new_zeros((values.shape[0], n_columns)).scatter_(1, columns, values)


def add_dense_auxk_gradients(
    needs: Needs,
    grads: Gradients,
    selection: Selection,
    dead_indices: Tensor,
    grad_auxk_decoded: Tensor | None,
    grad_auxk_values: Tensor | None,
) -> Gradients:
    """`grads` plus the AuxK selection's gradients, by dense products over the dead
    latents' columns: the entries' gradients `grad_auxk_decoded @ decoder[dead].T` (plus
    the direct ones), zero where the selection is not positive, then one matmul each for
    the decoder's, the encoder's and the inputs' gradients."""
    x, encoder_weight, table, _, _, values, columns = selection
    n_dead = dead_indices.numel()
    kept = values > 0  # entries ReLU zeroed, or NaN, add nothing (as in the sparse pass)
    dense_values = scatter_columns(torch.where(kept, values, 0).float(), columns, n_dead)
    if grad_auxk_decoded is None:
        grad_entries = dense_values.new_zeros(dense_values.shape)
    else:
        grad_auxk_decoded = grad_auxk_decoded.float()
        grad_entries = grad_auxk_decoded @ table.index_select(0, dead_indices).t()
    if grad_auxk_values is not None:
        grad_entries.scatter_add_(1, columns, grad_auxk_values.float())
    keep = torch.zeros_like(dense_values, dtype=torch.bool).scatter_(1, columns, kept)
    grad_entries = grad_entries.masked_fill_(~keep, 0)
    grad_x, grad_bias, grad_encoder, grad_decoder = grads
    if needs.decoder and grad_auxk_decoded is not None:
        grad_decoder = grad_decoder.index_add_(
            0, dead_indices, dense_values.t() @ grad_auxk_decoded
        )
    if needs.encoder:
        grad_encoder = grad_encoder.index_add_(0, dead_indices, grad_entries.t() @ x.float())
    dead_weight = encoder_weight.index_select(0, dead_indices).float()
    if needs.inputs:
        grad_x = grad_x + grad_entries @ dead_weight
    elif needs.bias:
        grad_bias = grad_bias - grad_entries.sum(0) @ dead_weight
    return Gradients(grad_x, grad_bias, grad_encoder, grad_decoder)


def torch_sparse_gradients(
    needs: Needs,
    selection: Selection,
    grad_values: Tensor | None,
    grad_auxk_values: Tensor | None,
    grad_decoded: Tensor | None,
    grad_auxk_decoded: Tensor | None,
) -> Gradients:
    """The sparse backward with torch operations: one latent order of the kept entries
    for the values', the decoder's and the encoder's gradients."""
    x, encoder_weight, table, values, indices, auxk_values, auxk_indices = selection
    n_vectors, k = indices.shape
    n_latents = encoder_weight.shape[0]
    selected = torch.cat([indices, auxk_indices], dim=1)
    all_values = torch.cat([values, auxk_values], dim=1)
    width = selected.shape[1]
    # Entries that ReLU zeroed add nothing to any gradient (their values are zero and
    # so is their own gradient): the order leaves them out.
    entries = LatentOrder(selected, n_latents, keep=all_values > 0)
    if grad_decoded is None:
        grad_decoded = torch.zeros_like(x)
    # Entry (v, i) was decoded into row v of `decoded` (i < k) or of `auxk_decoded`
    # (i >= k): row v or n_vectors + v of the stacked gradients.
    if auxk_indices.shape[1] > 0:
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

    grad_x = grad_bias = grad_encoder = grad_decoder = None
    if needs.decoder:
        grad_decoder = bag_sum(grad_out, grad_rows, sorted_values, entries.offsets)
    if needs.encoder:
        grad_encoder = bag_sum(x.float(), entries.vectors, grad_entries, entries.offsets)
    weight = encoder_weight.float()
    if needs.inputs:
        in_vector_order = grad_entries.new_zeros(selected.numel())
        in_vector_order.index_copy_(0, entries.order, grad_entries)
        grad_x = torch.nn.functional.embedding_bag(
            selected,
            weight,
            per_sample_weights=in_vector_order.view(n_vectors, width),
            mode="sum",
        )
    elif needs.bias:
        grad_bias = bias_gradient(entries.latents, grad_entries, weight)
    return Gradients(grad_x, grad_bias, grad_encoder, grad_decoder)


def native_sparse_gradients(
    needs: Needs,
    selection: Selection,
    grad_values: Tensor | None,
    grad_auxk_values: Tensor | None,
    grad_decoded: Tensor | None,
    grad_auxk_decoded: Tensor | None,
) -> Gradients:
    """The sparse backward by `native.sparse_backward`, for fp32 CPU tensors: one kernel
    computes the entries' gradients and the decoder's and encoder's."""
    x, encoder_weight, table, values, indices, auxk_values, auxk_indices = selection
    selected = torch.cat([indices, auxk_indices], dim=1)
    all_values = torch.cat([values, auxk_values], dim=1)
    grad_main = torch.zeros_like(x) if grad_decoded is None else grad_decoded.float()
    if auxk_indices.shape[1] == 0:
        grad_aux = None
    elif grad_auxk_decoded is None:
        grad_aux = torch.zeros_like(x)
    else:
        grad_aux = grad_auxk_decoded.float()
    direct = _direct_gradients(grad_values, grad_auxk_values, values, auxk_values)
    dvals, grad_decoder, grad_encoder, latent_sums = native.sparse_backward(
        selected,
        all_values,
        indices.shape[1],
        grad_main,
        grad_aux,
        table,
        x if needs.encoder else None,
        direct,
        latent_sums=needs.bias and not needs.inputs,
    )
    grad_x = grad_bias = None
    if needs.inputs:
        grad_x = torch.nn.functional.embedding_bag(
            selected, encoder_weight, per_sample_weights=dvals, mode="sum"
        )
    elif needs.bias:
        grad_bias = -(latent_sums @ encoder_weight)
    return Gradients(
        grad_x,
        grad_bias,
        grad_encoder if needs.encoder else None,
        grad_decoder if needs.decoder else None,
    )


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
