"""Geometric median by Weiszfeld's algorithm, used to initialise the pre-encoder bias."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "... n_inputs"],
    mask: Bool[Tensor, "..."] | None = None,
    max_iter: int = 100,
    tol: float = 1e-5,
) -> Float[Tensor, " n_inputs"]:
    """The point minimising the sum of Euclidean distances to `points`.

    Every leading dimension is flattened into one set of points. Weiszfeld's
    iteration starts from the mean and stops after `max_iter` steps or once a step
    moves less than `tol`. `mask` (True = keep), broadcast to the leading shape, drops
    points, e.g. the zeroed vectors at special-token positions.
    """
    if mask is not None:
        points = points[mask.expand(points.shape[:-1])]
    points = points.reshape(-1, points.shape[-1])
    if points.shape[0] == 0:
        raise ValueError("geometric_median needs at least one point")
    points = points.float()
    current = points.mean(dim=0)
    for _ in range(max_iter):
        previous = current
        # A point that coincides with the estimate would get an infinite weight.
        distances = torch.norm(points - current, dim=1).clamp_min(torch.finfo(points.dtype).tiny)
        weights = 1 / distances
        weights /= weights.sum()
        current = (weights.unsqueeze(1) * points).sum(dim=0)
        if torch.norm(current - previous) < tol:
            break
    return current
