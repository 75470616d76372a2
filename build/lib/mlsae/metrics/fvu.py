"""Fraction of variance unexplained, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.model.losses import layerwise_mse_and_var


class LayerwiseFVU(Metric):
    """Per layer: the sum over batches of the reconstruction MSE divided by the sum
    over batches of the inputs' unbiased variance (one batch: MSE / var)."""

    is_differentiable = True
    full_state_update = False

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.add_state("layer_mse", torch.zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("layer_var", torch.zeros(n_layers), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        mse, var = layerwise_mse_and_var(inputs, recons, mask)
        self.layer_mse += mse.float()
        self.layer_var += var.float()

    def compute(self) -> Float[Tensor, " layer"]:
        return self.layer_mse / self.layer_var
