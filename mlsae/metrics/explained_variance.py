"""Explained variance per layer, as SAELens and SAEBench compute it.

Both treat each position's vector as one sample. `LayerwiseExplainedVariance` is SAELens'
`explained_variance` (`sae_lens.evals.ExplainedVarianceCalculator`): one minus the summed
squared error over the summed squared distance from the mean vector, both over every
position that counts in the whole evaluation. `LayerwiseExplainedVarianceLegacy` is the
per-position formula that SAELens keeps as `explained_variance_legacy` and SAEBench's core
evaluation reports as `explained_variance`: each position's `1 - ||x - x_hat||^2 /
||x - mean_batch||^2`, averaged over positions. docs/evaluation.md compares them with the FVU.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torchmetrics import Metric

from mlsae.metrics.layerwise import LayerwiseRatio
from mlsae.metrics.masking import count_positions, position_weights

TINY_VARIANCE = 1e-10
"""SAELens' floor: below this total variance per sample the explained variance is 1 if the
MSE per sample is below it too, else 0."""


def batch_mean_vectors(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "layer 1 1 n_inputs"]:
    """Per layer: the mean input vector over the batch's positions that count, in float32
    (0 where none counts)."""
    weights = position_weights(mask, inputs).float()
    return (inputs.float() * weights).sum(dim=(1, 2), keepdim=True) / weights.sum().clamp(min=1)


class LayerwiseExplainedVariance(Metric):
    """Per layer: `1 - sum ||x - x_hat||^2 / sum ||x - mean||^2` over every position that
    counts in every batch, where `mean` is the mean vector over all of them (SAELens'
    `explained_variance`).

    Each batch adds its vectors' sum, its squared distances from its own mean and the
    squared norm of that mean times its positions (in float64), so the total squared
    distance from the overall mean is exact without a second pass and without the
    cancellation of `E||x||^2 - ||E x||^2`.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, n_inputs: int) -> None:
        super().__init__()
        f64 = torch.float64
        self.add_state("vector_sum", torch.zeros(n_layers, n_inputs, dtype=f64), "sum")
        self.add_state("within_batches", torch.zeros(n_layers, dtype=f64), "sum")
        self.add_state("squared_batch_means", torch.zeros(n_layers, dtype=f64), "sum")
        self.add_state("squared_error", torch.zeros(n_layers, dtype=f64), "sum")
        self.add_state("samples", torch.tensor(0.0, dtype=f64), "sum")

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        weights = position_weights(mask, inputs).float()
        samples = weights.sum()
        mean = batch_mean_vectors(inputs, mask)
        within = ((inputs.float() - mean).pow(2) * weights).sum(dim=(1, 2, 3))
        error = ((inputs.float() - recons.float()).pow(2) * weights).sum(dim=(1, 2, 3))
        mean, samples = mean.flatten(1).double(), samples.double()
        self.vector_sum += mean * samples
        self.within_batches += within.double()
        self.squared_batch_means += mean.pow(2).sum(dim=-1) * samples
        self.squared_error += error.double()
        self.samples += samples

    def compute(self) -> Float[Tensor, " layer"]:
        between = self.squared_batch_means - self.vector_sum.pow(2).sum(dim=-1) / self.samples
        variance = (self.within_batches + between) / self.samples
        mse = self.squared_error / self.samples
        explained = 1 - mse / variance
        floor = torch.where(mse < TINY_VARIANCE, 1.0, 0.0).to(explained)
        return torch.where(variance < TINY_VARIANCE, floor, explained).float()


class LayerwiseExplainedVarianceLegacy(LayerwiseRatio):
    """Per layer: the mean over positions that count of `1 - ||x - x_hat||^2 /
    ||x - mean_batch||^2`, where `mean_batch` is the mean vector over the batch's positions
    that count (SAELens' `explained_variance_legacy`, SAEBench's `explained_variance`)."""

    @torch.no_grad()
    def update(
        self,
        inputs: Float[Tensor, "layer batch pos n_inputs"],
        recons: Float[Tensor, "layer batch pos n_inputs"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        error = (inputs.float() - recons.float()).pow(2).sum(dim=-1)
        spread = (inputs.float() - batch_mean_vectors(inputs, mask)).pow(2).sum(dim=-1)
        explained = 1 - error / spread
        if mask is not None:
            explained = torch.where(mask, explained, 0.0)
        self._add(explained.sum(dim=(1, 2)), count_positions(mask, inputs))
