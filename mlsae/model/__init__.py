"""The models: the autoencoder, the transformer wrapper and the LightningModule."""

from typing import TYPE_CHECKING, Any

from mlsae.model.autoencoder import MLSAE, AutoencoderOutput, EncoderOutput
from mlsae.model.types import Stats, TopK

if TYPE_CHECKING:
    from mlsae.lm.transformer import Transformer
    from mlsae.model.lightning import MLSAETransformer

__all__ = [
    "MLSAE",
    "AutoencoderOutput",
    "EncoderOutput",
    "MLSAETransformer",
    "Stats",
    "TopK",
    "Transformer",
]

_LAZY = {
    "MLSAETransformer": "mlsae.model.lightning",
    "Transformer": "mlsae.lm.transformer",
}


def __getattr__(name: str) -> Any:
    # Lightning and transformers take seconds to import: only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
