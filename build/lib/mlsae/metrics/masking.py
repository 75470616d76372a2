"""Which positions a metric counts: all, or those where `mask` is True."""

from jaxtyping import Bool
from torch import Tensor


def position_weights(mask: Bool[Tensor, "batch pos"] | None, like: Tensor) -> Tensor:
    """`[1, batch, pos, 1]` weights (1 = counts) for a `[layer, batch, pos, ...]` tensor."""
    if mask is None:
        return like.new_ones((1, like.shape[1], like.shape[2], 1))
    return mask.to(like.dtype)[None, :, :, None]


def count_positions(mask: Bool[Tensor, "batch pos"] | None, like: Tensor) -> Tensor:
    """The number of `[batch, pos]` positions that count, as a tensor on `like`'s device."""
    if mask is None:
        return like.new_tensor(like.shape[1] * like.shape[2], dtype=like.dtype)
    return mask.sum().to(like.dtype)
