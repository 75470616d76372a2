"""Matryoshka's prefixes: how well the latents of each prefix reconstruct on their own."""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.metrics.reconstruction import layerwise_mse_and_var


class PrefixFVU(Metric):
    """`fvu/prefix_<w>` for every prefix width w: per layer, the FVU (the sum over batches
    of the MSE over the sum of the inputs' variance, as `LayerwiseFVU`) of the
    reconstruction from latents `[0, w)`, averaged over layers. Updated with `inputs`,
    `prefix_recons` (one reconstruction per width, in order) and `mask`."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.widths = tuple(widths)
        zeros = torch.zeros(len(self.widths), n_layers)
        self.add_state("mse", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("var", zeros.clone(), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        prefix_recons: Sequence[Float[Tensor, "layer batch pos n_inputs"]],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        if len(prefix_recons) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} prefix reconstructions")
        for i, recons in enumerate(prefix_recons):
            mse, var = layerwise_mse_and_var(inputs.detach(), recons.detach(), mask)
            self.mse[i] += mse.float()
            self.var[i] += var.float()

    def compute(self) -> dict[str, Tensor]:
        fvu = (self.mse / self.var).mean(dim=1)
        return {f"fvu/prefix_{width}": fvu[i] for i, width in enumerate(self.widths)}
