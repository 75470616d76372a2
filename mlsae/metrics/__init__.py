"""torchmetrics metrics of an MLSAE, layerwise where that makes sense, and the tensor
formulas and constants they share.

Where each concept lives: `layerwise` (the accumulating base and the logging wrapper),
`reconstruction` (MSE, variance and AuxK formulas), `masking` (which positions count),
`layers` (statistics of a distribution over the stack's layers), `firing` (the firing
threshold), `losses` (the original's training losses as metrics), `explained_variance` and
`density` (what SAELens and SAEBench report, docs/evaluation.md).
"""

from mlsae.metrics.dead_latents import DeadLatents
from mlsae.metrics.density import (
    DENSE_DENSITY,
    LayerwiseDenseLatents,
    LayerwiseLatentDensity,
    LayerwiseNeverFired,
)
from mlsae.metrics.explained_variance import (
    LayerwiseExplainedVariance,
    LayerwiseExplainedVarianceLegacy,
)
from mlsae.metrics.firing import FIRING_THRESHOLD
from mlsae.metrics.fvu import LayerwiseFVU
from mlsae.metrics.l0 import LayerwiseL0Norm
from mlsae.metrics.l1 import LayerwiseL1Norm
from mlsae.metrics.layers import layer_mean, layer_std, layer_variance
from mlsae.metrics.layerwise import LayerwiseRatio, LayerwiseWrapper, layerwise
from mlsae.metrics.losses import AuxiliaryLoss, MSELoss
from mlsae.metrics.masking import count_positions, position_weights
from mlsae.metrics.mse import LayerwiseMSE
from mlsae.metrics.spliced import (
    LayerwiseLogitKLDiv,
    LayerwiseLogitKLDivPerToken,
    LayerwiseLogitMSE,
    LayerwiseLossDelta,
    LayerwiseLossRecovered,
    count_predictions,
)

__all__ = [
    "DENSE_DENSITY",
    "FIRING_THRESHOLD",
    "AuxiliaryLoss",
    "DeadLatents",
    "LayerwiseDenseLatents",
    "LayerwiseExplainedVariance",
    "LayerwiseExplainedVarianceLegacy",
    "LayerwiseFVU",
    "LayerwiseL0Norm",
    "LayerwiseL1Norm",
    "LayerwiseLatentDensity",
    "LayerwiseLogitKLDiv",
    "LayerwiseLogitKLDivPerToken",
    "LayerwiseLogitMSE",
    "LayerwiseLossDelta",
    "LayerwiseLossRecovered",
    "LayerwiseMSE",
    "LayerwiseNeverFired",
    "LayerwiseRatio",
    "LayerwiseWrapper",
    "MSELoss",
    "count_positions",
    "count_predictions",
    "layer_mean",
    "layer_std",
    "layer_variance",
    "layerwise",
    "position_weights",
]
