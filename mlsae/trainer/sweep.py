"""`train_sweep(args)`: several MLSAEs trained on one forward pass of the transformer.

Each SAE of the sweep is a `SweepMember` (an `MLSAETransformer`) with its own Lightning
trainer, optimizer, schedule, logger, checkpoints and run folder, built exactly as a single
run builds it (seeded the same way just before). The trainers run in threads that take
turns (`mlsae.trainer.turns`), one micro-batch each, in a fixed order; the first computes
the micro-batch's residual stream and the others read the same tensors. docs/sweeps.md.
"""

import logging
import signal
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from mlsae.cli import ConfigError, initialize
from mlsae.files import remove_partials
from mlsae.lm.data import data_loader, load_tokenizer
from mlsae.model.checkpoint import check_transformer, read_checkpoint
from mlsae.model.sweep import SharedResidualStream, SweepMember
from mlsae.trainer.callbacks import TokensPerSecondBar
from mlsae.trainer.config import check_run_config
from mlsae.trainer.faults import (
    RunCheckpoints,
    TrainingInterrupted,
    prune_orphan_checkpoints,
    remove_empty_folders,
)
from mlsae.trainer.resume import RecordRun, check_resume
from mlsae.trainer.sweep_checkpoints import SweepCheckpoints, committed_checkpoints
from mlsae.trainer.sweep_options import SweepMemberOptions, sweep_dir, sweep_members
from mlsae.trainer.train import make_trainer, model_options, save_trained
from mlsae.trainer.turns import SharedBatches, SweepAborted, Turns

logger = logging.getLogger(__name__)


class Sweep:
    """What the SAEs of a sweep share: the turns, the commit of checkpoints, the stop."""

    def __init__(self, members: list[SweepMemberOptions], checkpoints: SweepCheckpoints) -> None:
        self.members = members
        self.turns = Turns(len(members))
        self.checkpoints = checkpoints
        self.stop_requested = False
        self.stop_step: int | None = None

    def should_stop(self, index: int, step: int) -> bool:
        """Whether the SAEs stop after `step`: decided by the first SAE, which reaches every
        step's end before the others, so that all stop after the same step."""
        if index == 0 and self.stop_requested and self.stop_step is None:
            self.stop_step = step
        return self.stop_step is not None and step >= self.stop_step


class SweepMemberCallback(Callback):
    """One SAE's part in the sweep: it takes its turn before each micro-batch, writes its
    checkpoint of the steps the sweep commits, and stops with the others."""

    def __init__(self, sweep: Sweep, index: int) -> None:
        self.sweep = sweep
        self.index = index
        self.member = sweep.members[index]
        self.every = self.member.config.trainer.checkpoint_every_n_steps

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.sweep.turns.give(self.index)
        self.sweep.turns.take(self.index)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        step = trainer.global_step
        stop = self.sweep.should_stop(self.index, step)
        if stop or step % max(1, self.every) == 0 or step >= trainer.max_steps:
            self._save(trainer, step)
        if stop:
            run_checkpoints = Path(self.member.config.trainer.run_dir) / self.member.name
            trainer.save_checkpoint(run_checkpoints / "checkpoints" / "last.ckpt")
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A stream that ends before max_steps ends the run: commit its last step too.
        step = trainer.global_step
        if not self.sweep.checkpoints.path(step, self.member.name).is_file():
            self._save(trainer, step)

    def _save(self, trainer: Trainer, step: int) -> None:
        path = self.sweep.checkpoints.path(step, self.member.name)
        trainer.save_checkpoint(path, weights_only=False)
        self.sweep.checkpoints.saved(step, self.member.name)


def check_members(members: list[SweepMemberOptions]) -> None:
    """Each SAE's options checked as a single run's (the error names the SAE), and the
    options a sweep cannot take."""
    for member in members:
        try:
            check_run_config(member.config)
        except ConfigError as error:
            raise ConfigError(f"{member.name}: {error}") from None
    trainer = members[0].config.trainer
    if trainer.strategy != "auto" or trainer.num_nodes != 1 or trainer.devices not in ("auto", "1"):
        raise ConfigError("a sweep trains on one device: leave --devices, --strategy, --num_nodes")


def train_sweep(
    args: list[str], extra_callbacks: Callable[[int, str], list[Any]] | None = None
) -> list[Path]:
    """Train every SAE of the sweep that the command line `args` asks for; returns their
    output folders. `extra_callbacks(index, name)` adds callbacks to one SAE's trainer.

    Raises `TrainingInterrupted` when SIGTERM stops the sweep, after committing the step
    every SAE finished."""
    members, base = sweep_members(args)
    check_members(members)
    folder = sweep_dir(base, members)
    run_dirs = [Path(m.config.trainer.run_dir) / m.name for m in members]
    try:
        return _train_sweep(members, base.trainer.checkpoint_path, folder, extra_callbacks)
    except BaseException:
        for run_dir in [*run_dirs, folder]:
            remove_empty_folders(run_dir)
        raise


def _train_sweep(
    members: list[SweepMemberOptions],
    checkpoint_path: str | None,
    folder: Path,
    extra_callbacks: Callable[[int, str], list[Any]] | None,
) -> list[Path]:
    names = [m.name for m in members]
    checkpoints_dir = folder / "checkpoints"
    resume_paths: dict[str, Path] = {}
    if checkpoint_path is not None:
        _, resume_paths = committed_checkpoints(checkpoint_path, names)
    sweep = Sweep(members, SweepCheckpoints(checkpoints_dir, names))
    shared = SharedResidualStream(len(members))
    built: list[tuple[Trainer, SweepMember, Any, str | None]] = []
    skipped: set[int] = set()
    for index, member in enumerate(members):
        config = member.config
        if config.trainer.devices == "auto":
            config.trainer.devices = "1"
        # Seeded as a single run seeds before building its model.
        initialize(config.seed)
        run_dir = Path(config.trainer.run_dir) / member.name
        remove_partials(run_dir / "checkpoints")
        ckpt = str(resume_paths[member.name]) if resume_paths else None
        checkpoint = read_checkpoint(ckpt) if ckpt else None
        resumed = {} if checkpoint is None else checkpoint.get("mlsae", {})
        callbacks = [SweepMemberCallback(sweep, index), RecordRun(config.data)]
        callbacks += [TokensPerSecondBar()] if index == 0 else []
        callbacks += extra_callbacks(index, member.name) if extra_callbacks else []
        epoch = 0 if checkpoint is None else checkpoint.get("epoch", 0)
        trainer = make_trainer(
            config, member.name, run_dir, callbacks, epoch, enable_progress_bar=index == 0
        )
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, RunCheckpoints):
                # The run's checkpoint of a step the sweep saved is the same file, linked.
                callback.written_at = partial(sweep.checkpoints.path, name=member.name)
        if checkpoint is not None:
            check_resume(ckpt, checkpoint, model_options(config), config, trainer.world_size)
            last = run_dir / "checkpoints" / "last.ckpt"
            prune_orphan_checkpoints(last.parent, checkpoint, last)
        del checkpoint
        try:
            model = SweepMember(**model_options(config))
        except ValueError as error:  # options that need the model's width, named per SAE
            raise ConfigError(f"{member.name}: {error}") from None
        if ckpt:
            check_transformer(ckpt, resumed, model.transformer)
        if built:
            model.share_transformer(built[0][1])
        model.shared = shared
        skipped.add(resumed.get("micro_batches_seen", 0))
        built.append((trainer, model, config, ckpt))
    if len(skipped) != 1:
        raise ConfigError(f"the sweep's checkpoints are at different positions: {sorted(skipped)}")

    config = members[0].config
    data = config.data
    tokenizer = load_tokenizer(built[0][1].transformer.tokenizer)
    val_blocks = 0 if data.val_path else data.val_blocks
    train_loader = data_loader(
        data,
        tokenizer,
        start_block=val_blocks + skipped.pop() * data.batch_size,
        stop_block=val_blocks + data.max_steps * data.batch_size,
        single_pass=True,
    )
    batches = SharedBatches(train_loader, len(members))

    def val_loader() -> Any:
        return data_loader(
            data,
            tokenizer,
            stop_block=data.val_blocks,
            path=data.val_path,
            split=data.val_split if data.val_path else None,
        )

    val_loaders = [val_loader() for _ in members]
    _fit_in_turns(sweep, built, batches, val_loaders)

    step = built[0][0].global_step
    if sweep.stop_step is not None:
        raise TrainingInterrupted(
            f"Stopped by SIGTERM after step {step}: saved every SAE's checkpoint in "
            f"{checkpoints_dir}; resume with --checkpoint_path {checkpoints_dir} and the same "
            "options"
        )
    outputs = []
    for (trainer, model, member_config, _), loader in zip(built, val_loaders, strict=True):
        output_dir = Path(member_config.trainer.run_dir) / member_config.run / "model"
        save_trained(trainer, model, loader, output_dir)
        outputs.append(output_dir)
    return outputs


def _fit_in_turns(
    sweep: Sweep, built: list[tuple[Trainer, SweepMember, Any, str | None]], batches, val_loaders
) -> None:
    """Fit every SAE, each in its thread, taking turns; re-raise the first failure."""
    errors: list[BaseException | None] = [None] * len(built)

    def fit(index: int) -> None:
        trainer, model, _, ckpt = built[index]
        try:
            sweep.turns.take(index)
            trainer.fit(model, batches.view(index), val_loaders[index], ckpt_path=ckpt)
            sweep.turns.finish(index)
        except BaseException as error:
            errors[index] = error
            sweep.turns.finish(index, error)

    def on_sigterm(signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: saving every SAE's checkpoint at the end of this step")
        sweep.stop_requested = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    threads = [threading.Thread(target=fit, args=(i,), daemon=True) for i in range(len(built))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except BaseException as error:
        sweep.turns.abort(error)
        for thread in threads:
            thread.join()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failures = [e for e in errors if e is not None and not isinstance(e, SweepAborted)]
    if failures:
        raise failures[0]
    if any(errors):
        raise next(e for e in errors if e is not None)
