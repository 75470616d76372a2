"""The k largest values of every row, exactly, fast on the CPU where k is small."""

from jaxtyping import Float
from torch import Tensor

from mlsae.sparse import native
from mlsae.sparse.backend import uses_native
from mlsae.sparse.tuning import TUNING


def fast_topk(
    x: Float[Tensor, "rows n"], k: int, use_native: bool = False
) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=-1, sorted=False)`, exact, faster on the CPU where k is small next
    to n.

    A row's n columns are cut into `groups` interleaved slices of `n / groups` columns;
    block b holds column b of every slice. The k blocks with the largest maxima hold all
    of the row's k largest values: any other element is exceeded by k block maxima, so
    it is not among the k largest. The top-k then runs over `groups * k` candidates
    instead of n, and the block maxima are an elementwise max of `groups` contiguous
    slices, which vectorises. `groups` is the largest power of two up to
    `Tuning.max_topk_groups` that divides n and leaves at least `4 * k` blocks; with fewer than
    two groups, or off the CPU, this is `torch.topk`. With `use_native` (the `native`
    backend; fp32 CPU input only), the C kernel `native.topk` runs instead (one pass). The
    selected values are identical to `torch.topk`'s; among tied values the indices may
    differ.
    """
    if use_native and uses_native("native", x) and x.dim() == 2 and 0 < k <= x.shape[-1]:
        return native.topk(x, k)
    n = x.shape[-1]
    groups = TUNING.max_topk_groups
    while groups > 1 and (n % groups or n // groups < 4 * k):
        groups //= 2
    if x.device.type != "cpu" or x.dim() != 2 or groups < 2 or k == 0:
        return x.topk(k, dim=-1, sorted=False)
    width = n // groups
    blocks = x.unflatten(-1, (groups, width))
    block_max = blocks.amax(dim=1)
    _, block_indices = block_max.topk(k, dim=-1, sorted=False)
    candidates = blocks.gather(2, block_indices.unsqueeze(1).expand(-1, groups, k))
    values, positions = candidates.flatten(1).topk(k, dim=-1, sorted=False)
    indices = (positions // k) * width + block_indices.gather(1, positions % k)
    return values, indices
