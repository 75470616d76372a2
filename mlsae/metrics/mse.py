"""Mean squared reconstruction error, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.reconstruction import layerwise_mse_and_var


class LayerwiseMSE(LayerwiseRatio):
    """Per layer: the mean over batches of the mean squared error over the layer's
    elements (at the positions that count)."""

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        mse, _var = layerwise_mse_and_var(inputs, recons, mask)
        self._add(mse)
