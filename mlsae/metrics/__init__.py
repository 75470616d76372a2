"""torchmetrics metrics of an MLSAE, layerwise where that makes sense, and the tensor
formulas and constants they share.

Where each concept lives: `layerwise` (the accumulating base and the logging wrapper),
`reconstruction` (MSE, variance and AuxK formulas), `masking` (which positions count),
`layers` (statistics of a distribution over the stack's layers), `firing` (the firing
threshold), `losses` (the original's training losses as metrics).
"""

from mlsae.metrics.dead_latents import DeadLatents
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
)

__all__ = [
    "FIRING_THRESHOLD",
    "AuxiliaryLoss",
    "DeadLatents",
    "LayerwiseFVU",
    "LayerwiseL0Norm",
    "LayerwiseL1Norm",
    "LayerwiseLogitKLDiv",
    "LayerwiseLogitKLDivPerToken",
    "LayerwiseLogitMSE",
    "LayerwiseLossDelta",
    "LayerwiseMSE",
    "LayerwiseRatio",
    "LayerwiseWrapper",
    "MSELoss",
    "count_positions",
    "layer_mean",
    "layer_std",
    "layer_variance",
    "layerwise",
    "position_weights",
]
