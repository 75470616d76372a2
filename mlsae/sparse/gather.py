"""Sparse sums of table rows (`embedding_bag`), gathered in cache-sized column slices."""

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mlsae.sparse.tuning import TUNING


def column_chunk(
    n_columns: int, n_rows: int, n_entries: int, n_bags: int, itemsize: int = 4
) -> int:
    """The width of the column slices `bag_sum` gathers `n_entries` rows of an `[n_rows,
    n_columns]` table into `n_bags` sums in.

    A gather from a table larger than the cache fetches every row from memory; one slice of
    the columns at a time is small enough to stay in the cache, so a row used by several
    entries is fetched once per slice. Slicing pays only where rows are reused (at least 4
    entries per row on average) and the gathers outweigh writing the output (at least 4
    entries per bag: each slice's output is a fresh tensor, copied into place). The width
    is the largest power of two from `Tuning.min_column_chunk` whose slice fits
    `Tuning.cache_budget_bytes`.
    """
    if n_entries < 4 * n_rows or n_entries < 4 * n_bags:
        return n_columns
    chunk = TUNING.min_column_chunk
    budget = TUNING.cache_budget_bytes
    while chunk * 2 <= n_columns and n_rows * chunk * 2 * itemsize <= budget:
        chunk *= 2
    return min(chunk, n_columns)


def bag_sum(
    table: Float[Tensor, "rows columns"],
    indices: Tensor,
    per_sample_weights: Tensor,
    offsets: Tensor | None = None,
) -> Float[Tensor, "bags columns"]:
    """`F.embedding_bag(indices, table, offsets, per_sample_weights=..., mode="sum")`,
    gathered in column slices of `column_chunk` width where that keeps rows cached.

    The table may be any tensor with unit column stride (a slice of a wider tensor, or the
    transpose of a column-major one). Each output column sums the same terms in the same
    order as one `embedding_bag` over the whole table, so the result is identical to it.
    """
    n_rows, n_columns = table.shape
    n_bags = indices.shape[0] if offsets is None else offsets.shape[0]
    chunk = column_chunk(n_columns, n_rows, indices.numel(), n_bags, table.element_size())
    if chunk >= n_columns or table.device.type != "cpu":
        return F.embedding_bag(
            indices, table, offsets, per_sample_weights=per_sample_weights, mode="sum"
        )
    out = table.new_empty((n_bags, n_columns))
    for start in range(0, n_columns, chunk):
        columns = slice(start, start + chunk)
        out[:, columns] = F.embedding_bag(
            indices, table[:, columns], offsets, per_sample_weights=per_sample_weights, mode="sum"
        )
    return out
