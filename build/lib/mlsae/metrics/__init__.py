"""torchmetrics metrics of an MLSAE, layerwise where that makes sense."""

from mlsae.metrics.dead_latents import DeadLatents
from mlsae.metrics.fvu import LayerwiseFVU
from mlsae.metrics.l0 import LayerwiseL0Norm
from mlsae.metrics.l1 import LayerwiseL1Norm
from mlsae.metrics.layerwise import LayerwiseWrapper
from mlsae.metrics.mse import LayerwiseMSE
from mlsae.metrics.spliced import (
    LayerwiseLogitKLDiv,
    LayerwiseLogitMSE,
    LayerwiseLossDelta,
)

__all__ = [
    "DeadLatents",
    "LayerwiseFVU",
    "LayerwiseL0Norm",
    "LayerwiseL1Norm",
    "LayerwiseLogitKLDiv",
    "LayerwiseLogitMSE",
    "LayerwiseLossDelta",
    "LayerwiseMSE",
    "LayerwiseWrapper",
]
