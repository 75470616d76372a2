"""Logging of layerwise metrics under `<prefix>layer_{i}` and `<prefix>avg`."""

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics import ClasswiseWrapper, Metric


class LayerwiseWrapper(ClasswiseWrapper):
    """Splits a metric's `[n_layers]` result into one value per layer plus their mean."""

    def __init__(self, metric: Metric, layers: list[int], prefix: str) -> None:
        super().__init__(metric, labels=[f"layer_{layer}" for layer in layers], prefix=prefix)

    def _convert_output(self, x: Float[Tensor, " layer"]) -> dict[str, Tensor]:
        values = super()._convert_output(x)
        return {**values, f"{self._prefix}avg": x.mean(dim=0, dtype=torch.float)}
