"""L0 norm of the latents, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.firing import FIRING_THRESHOLD
from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.masking import count_positions, position_weights


class LayerwiseL0Norm(LayerwiseRatio):
    """Per layer: the mean over tokens of how many top-k values exceed `threshold`."""

    def __init__(self, n_layers: int, threshold: float = FIRING_THRESHOLD) -> None:
        super().__init__(n_layers)
        self.threshold = threshold

    @torch.no_grad()
    def update(
        self,
        values: Float[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        nonzero = (values > self.threshold).float() * position_weights(mask, values)
        self._add(nonzero.sum(dim=(1, 2, 3)), count_positions(mask, values))
