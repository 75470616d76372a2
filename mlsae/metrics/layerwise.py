"""What every layerwise metric shares: accumulating a per-layer ratio over batches, and
logging its result under `<prefix>layer_{i}` and `<prefix>avg`."""

from collections.abc import Sequence
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics import ClasswiseWrapper, Metric


class LayerwiseRatio(Metric):
    """Per layer: the sum over batches of a value over the sum over batches of its weight.

    A subclass's `update` computes a batch's per-layer values and calls `_add`. The weight
    is one per batch by default (the result is the mean over batches), a scalar per batch
    (e.g. the tokens that count: the same for every layer), or per layer
    (`weight_per_layer=True`, e.g. a variance).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, weight_per_layer: bool = False) -> None:
        super().__init__()
        self.add_state("layer_sum", torch.zeros(n_layers), dist_reduce_fx="sum")
        weight = torch.zeros(n_layers) if weight_per_layer else torch.tensor(0.0)
        self.add_state("weight", weight, dist_reduce_fx="sum")

    def _add(
        self, values: Float[Tensor, " layer"], weight: Float[Tensor, "*layer"] | float = 1.0
    ) -> None:
        if not self.is_differentiable:
            values = values.detach()
            weight = weight.detach() if isinstance(weight, Tensor) else weight
        self.layer_sum += values.float()
        self.weight += weight.float() if isinstance(weight, Tensor) else weight

    def compute(self) -> Float[Tensor, " layer"]:
        return self.layer_sum / self.weight


def layer_labels(layers: Sequence[int | str]) -> list[str]:
    """`layer_{i}` for a layer index, a string label as it is."""
    return [label if isinstance(label, str) else f"layer_{label}" for label in layers]


class LayerwiseWrapper(ClasswiseWrapper):
    """Splits a metric's `[n_layers]` result into one value per layer plus their mean.

    The values are logged as `<prefix><label>` and `<prefix>avg`. Give the labels as the
    original did (`labels=["layer_0", ...]`, positional or by name) or the layers' indices
    (`layers=[0, 1, ...]`, or positionally as integers), which become `layer_{i}`.
    """

    def __init__(
        self,
        metric: Metric,
        labels: Sequence[str | int] | None = None,
        prefix: str | None = None,
        *,
        layers: Sequence[int] | None = None,
    ) -> None:
        if (labels is None) == (layers is None):
            raise TypeError("LayerwiseWrapper takes either labels or layers")
        if prefix is None:
            raise TypeError("LayerwiseWrapper needs a prefix (e.g. 'fvu/')")
        names = layer_labels(labels if labels is not None else layers)
        super().__init__(metric, labels=names, prefix=prefix)

    def _convert_output(self, x: Float[Tensor, " layer"]) -> dict[str, Tensor]:
        # torchmetrics squeezes a one-layer result to a scalar.
        x = x.reshape(-1)
        values = super()._convert_output(x)
        return {**values, f"{self._prefix}avg": x.mean(dim=0, dtype=torch.float)}


def layerwise(n_layers: int) -> "partial[LayerwiseWrapper]":
    """The original's shorthand: `layerwise(n)(metric, prefix="fvu/")` wraps `metric` with
    the labels `layer_0` .. `layer_{n-1}`."""
    return partial(LayerwiseWrapper, labels=[f"layer_{layer}" for layer in range(n_layers)])
