"""The models: the autoencoder (`MLSAE`), the LightningModule that wires it to a frozen
transformer (`MLSAETransformer`), and their hyperparameters.

The original's names import from here too: `Transformer`, `DataConfig`,
`get_train_dataloader`, `get_test_dataloader`, `MLSAEConfig`.
"""

from typing import TYPE_CHECKING, Any

from mlsae.model.autoencoder import MLSAE, AutoencoderOutput, EncoderOutput
from mlsae.model.hparams import MLSAEConfig, MLSAEHyperparameters
from mlsae.types import Stats, TopK

if TYPE_CHECKING:
    from mlsae.cli import DataConfig
    from mlsae.lm.transformer import Transformer
    from mlsae.model.data import get_test_dataloader, get_train_dataloader
    from mlsae.model.lightning import MLSAETransformer

__all__ = [
    "MLSAE",
    "AutoencoderOutput",
    "DataConfig",
    "EncoderOutput",
    "MLSAEConfig",
    "MLSAEHyperparameters",
    "MLSAETransformer",
    "Stats",
    "TopK",
    "Transformer",
    "get_test_dataloader",
    "get_train_dataloader",
]

_LAZY = {
    "MLSAETransformer": "mlsae.model.lightning",
    "Transformer": "mlsae.lm.transformer",
    "DataConfig": "mlsae.cli",
    "get_train_dataloader": "mlsae.model.data",
    "get_test_dataloader": "mlsae.model.data",
}


def __getattr__(name: str) -> Any:
    # Lightning and transformers take seconds to import: only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
