"""The spread of the L0 norm over vectors, per layer: BatchTopK's L0 varies per vector."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.metrics.firing import FIRING_THRESHOLD
from mlsae.metrics.masking import position_weights


class LayerwiseL0Std(Metric):
    """Per layer: the standard deviation (unbiased) over the vectors that count of the
    number of a vector's values that exceed `threshold`. Sums are kept in float64, over
    every batch seen (0 for a TopK model whose vectors all keep k latents above it)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, threshold: float = FIRING_THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold
        zeros = torch.zeros(n_layers, dtype=torch.float64)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("l0_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("l0_squares", zeros.clone(), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        values: Float[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        weights = position_weights(mask, values)[..., 0].double()
        l0 = (values > self.threshold).sum(-1).double() * weights
        self.count += weights.sum()
        self.l0_sum += l0.sum(dim=(1, 2))
        self.l0_squares += (l0 * l0).sum(dim=(1, 2))

    def compute(self) -> Float[Tensor, " layer"]:
        mean = self.l0_sum / self.count
        variance = (self.l0_squares - self.count * mean * mean) / (self.count - 1)
        return variance.clamp_min(0).sqrt().float()
