"""Mean squared reconstruction error, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.model.losses import layerwise_mse_and_var


class LayerwiseMSE(Metric):
    """Per layer: the mean over batches of the mean squared error over the layer's
    elements (at the positions that count)."""

    is_differentiable = True
    full_state_update = False

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.add_state("layer_mse", torch.zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("batches", torch.tensor(0.0), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        mse, _var = layerwise_mse_and_var(inputs, recons, mask)
        self.layer_mse += mse.float()
        self.batches += 1

    def compute(self) -> Float[Tensor, " layer"]:
        return self.layer_mse / self.batches
