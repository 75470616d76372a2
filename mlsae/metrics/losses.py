"""The original's training losses as metrics: `MSELoss` and `AuxiliaryLoss`.

Both are differentiable: called as a module (`metric(inputs=..., recons=...)`, i.e.
`forward`), they return the batch's loss with its gradient and accumulate it without one;
`compute()` gives the value over every batch so far. docs/compat-metrics.md says where they
differ from the original.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.reconstruction import auxk_loss, layerwise_mse_and_var


class MSELoss(LayerwiseRatio):
    """The FVU averaged over layers, as the original's training loss: per layer, the sum
    over batches of the reconstruction MSE over the sum over batches of the inputs'
    unbiased variance (`LayerwiseFVU`), then the mean over layers."""

    is_differentiable = True

    def __init__(self, n_layers: int) -> None:
        super().__init__(n_layers, weight_per_layer=True)

    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        mse, var = layerwise_mse_and_var(inputs, recons, mask)
        self._add(mse, var)

    def compute(self) -> Float[Tensor, ""]:
        return super().compute().mean()


class AuxiliaryLoss(Metric):
    """`auxk_coef` times the AuxK loss (`mlsae.metrics.reconstruction.auxk_loss`), averaged
    over the batches that had an auxiliary reconstruction.

    `inputs`, `recons` and `auxk_recons` must be in the same space (in training, the
    autoencoder's standardised one): the error `inputs - recons` is detached, and
    `auxk_recons` models it. A batch without `auxk_recons` (no dead latents) adds nothing.
    """

    is_differentiable = True
    full_state_update = False

    def __init__(self, auxk_coef: float) -> None:
        super().__init__()
        self.auxk_coef = auxk_coef
        self.add_state("loss_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("batches", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        auxk_recons: Float[Tensor, "layer batch pos n_inputs"] | None,
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        if auxk_recons is None:
            return
        self.loss_sum += auxk_loss(inputs - recons, auxk_recons, mask).float()
        self.batches += 1

    def compute(self) -> Float[Tensor, ""]:
        if self.batches == 0:
            return self.loss_sum.new_zeros(())
        return self.auxk_coef * self.loss_sum / self.batches
