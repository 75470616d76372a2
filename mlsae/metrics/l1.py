"""L1 norm of the latents, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.masking import count_positions, position_weights


class LayerwiseL1Norm(LayerwiseRatio):
    """Per layer: the mean over tokens of the sum of the absolute top-k values."""

    @torch.no_grad()
    def update(
        self,
        values: Float[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        absolute = values.abs().float() * position_weights(mask, values)
        self._add(absolute.sum(dim=(1, 2, 3)), count_positions(mask, values))
