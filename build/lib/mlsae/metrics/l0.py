"""L0 norm of the latents, per layer."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.metrics.masking import count_positions, position_weights


class LayerwiseL0Norm(Metric):
    """Per layer: the mean over tokens of how many top-k values exceed `threshold`."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, threshold: float = 1e-3) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("layer_nonzero", torch.zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        values: Float[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        nonzero = (values > self.threshold).float() * position_weights(mask, values)
        self.layer_nonzero += nonzero.sum(dim=(1, 2, 3))
        self.tokens += count_positions(mask, values).float()

    def compute(self) -> Float[Tensor, " layer"]:
        return self.layer_nonzero / self.tokens
