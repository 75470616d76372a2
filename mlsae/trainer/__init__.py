"""Training, testing and publishing MLSAEs: the entry points of `train.py`, `test.py` and
`upload.py`, their options, and the Lightning callbacks that make runs survive faults.

The original's names import from here: `initialize`, `RunConfig`, `SweepConfig`,
`TrainerConfig`, `train` and `test` (the functions; their modules stay importable as
`from mlsae.trainer.train import main`).
"""

from mlsae.cli import initialize
from mlsae.trainer.config import RunConfig, SweepConfig, TrainerConfig
from mlsae.trainer.test import test
from mlsae.trainer.train import train

__all__ = ["RunConfig", "SweepConfig", "TrainerConfig", "initialize", "test", "train"]
