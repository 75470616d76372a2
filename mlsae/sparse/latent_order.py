"""Selected entries sorted by latent, for the sparse backward passes."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.sparse.gather import bag_sum


class LatentOrder:
    """The entries of `[vectors, k]` latent indices sorted by latent, for the sparse
    backward passes that visit them latent by latent; with `keep`, only the entries it
    marks (a host sync, for their count).

    The sort is stable (each latent's entries stay in vector order) and runs on the
    narrowest integer keys that hold the latents (a sort's time grows with the key's
    width). The segment offsets come from a bincount rather than a search.
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
