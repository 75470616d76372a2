"""Surviving faults: atomic checkpoints, a checkpoint on SIGTERM, readable errors."""

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from mlsae.model.hub import CheckpointError

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it into place, so a crash
    while saving never leaves a truncated `last.ckpt`; a checkpoint that cannot be
    read gives an error that names the file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load` of a Lightning checkpoint, with a clear error for a bad file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({error})"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this library")
    return checkpoint


class CheckpointOnSigterm(Callback):
    """On SIGTERM (as a cluster scheduler sends before killing a job), finish the
    current optimizer step, save `last.ckpt`, and stop training cleanly.

    Lightning's own handler would stop mid-step; this one replaces it for the
    duration of training. Under DDP the ranks agree on the stop at each step boundary.
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received = False
        self.interrupted = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.received = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        received = self.received
        if trainer.world_size > 1:
            flag = torch.tensor(float(received), device=pl_module.device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)
        if received:
            trainer.save_checkpoint(self.checkpoint_path)
            self.interrupted = True
            trainer.should_stop = True
