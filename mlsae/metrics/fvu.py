"""Fraction of variance unexplained, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.reconstruction import layerwise_mse_and_var


class LayerwiseFVU(LayerwiseRatio):
    """Per layer: the sum over batches of the reconstruction MSE divided by the sum
    over batches of the inputs' unbiased variance (one batch: MSE / var)."""

    def __init__(self, n_layers: int) -> None:
        super().__init__(n_layers, weight_per_layer=True)

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        mse, var = layerwise_mse_and_var(inputs, recons, mask)
        self._add(mse, var)
