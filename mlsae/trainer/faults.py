"""Surviving faults: atomic checkpoints, a checkpoint on SIGTERM, orphans pruned on resume."""

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from mlsae.cli import CommandStopped
from mlsae.files import atomic_output
from mlsae.model.checkpoint import read_checkpoint

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its destination and renames it into place, so a crash
    while saving never leaves a truncated `last.ckpt` (a failed write leaves nothing; a full
    disk is a `DiskFullError` naming the folder); reads checkpoints as data only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        with atomic_output(path, what=f"the checkpoint {Path(path).name}") as partial:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location)


class RunCheckpoints(ModelCheckpoint):
    """`ModelCheckpoint` for a run folder: `last.ckpt` and the periodic checkpoint are
    overwritten in place (no `-v1` copies), and a checkpoint written in another folder (a
    run folder that was copied or moved) never makes it delete files of that folder."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(enable_version_counter=False, **kwargs)
        self.written_at: Callable[[int], Path] | None = None
        """Where a checkpoint of the current step may already have been written (a
        sweep's step checkpoint of this SAE): if it exists, it is linked, not written
        again."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:
            return
        super().load_state_dict(state_dict)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        written = None if self.written_at is None else self.written_at(trainer.global_step)
        if written is None or not written.is_file() or not _hard_link(written, Path(filepath)):
            super()._save_checkpoint(trainer, filepath)
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def _hard_link(source: Path, target: Path) -> bool:
    """`target` made another name of `source` (replacing it at once), or False where the
    file system cannot link."""
    temporary = target.with_name(f".{target.name}.link")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        return False
    return True


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
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
            self.interrupted = True
            trainer.should_stop = True


INTERRUPTED_EXIT_STATUS = 128 + signal.SIGTERM
"""The exit status of a run stopped by SIGTERM (what a shell reports for a process killed by
it), so that `train.py && next-step` does not go on as if training had finished."""


class TrainingInterrupted(CommandStopped):
    """Training stopped on SIGTERM; the message says what was saved and how to go on."""

    exit_status = INTERRUPTED_EXIT_STATUS


class DeferredSigterm:
    """While active, SIGTERM is recorded instead of ending the process, so that writing the
    final model completes; Lightning's own handler, installed during `validate`, still runs
    on top of this one and stops the validation loop."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: finishing the final model before stopping")
        self.received = True

    def __enter__(self) -> "DeferredSigterm":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def prune_orphan_checkpoints(
    folder: str | Path, checkpoint: dict[str, Any], resumed_from: str | Path
) -> list[Path]:
    """Remove the periodic checkpoints in `folder` that the resumed checkpoint does not know
    of: a process killed between writing a periodic checkpoint and `last.ckpt` leaves one
    that `save_top_k` would otherwise never remove. Returns the removed files."""
    folder = Path(folder)
    if Path(resumed_from).resolve().parent != folder.resolve():
        return []  # a checkpoint of another run's folder knows nothing of this one's files
    keep = {Path(resumed_from).resolve(), (folder / "last.ckpt").resolve()}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict):
            for key in ("best_model_path", "last_model_path"):
                if state.get(key):
                    keep.add(Path(state[key]).resolve())
    removed = []
    for path in sorted(folder.glob("epoch=*-step=*.ckpt")):
        if path.resolve() not in keep:
            logger.info("removing %s, a checkpoint newer than the one resumed from", path)
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_empty_folders(root: str | Path) -> None:
    """Remove `root` and the folders below it that hold no file (a run that failed before
    writing anything leaves its logs folders empty)."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()
