"""`train(config)`: fit an MLSAE on a transformer's residual stream with Lightning."""

import logging
import math
import netrc
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mlsae import names
from mlsae.files import atomic_output, remove_partials
from mlsae.lm.data import data_loader, load_tokenizer
from mlsae.model.checkpoint import check_transformer, read_checkpoint
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.callbacks import TokensPerSecondBar
from mlsae.trainer.config import RunConfig, check_run_config, default_precision, initialize, parse
from mlsae.trainer.faults import (
    AtomicCheckpointIO,
    CheckpointOnSigterm,
    DeferredSigterm,
    RunCheckpoints,
    TrainingInterrupted,
    prune_orphan_checkpoints,
    remove_empty_folders,
)
from mlsae.trainer.quiet import quiet_lightning
from mlsae.trainer.resume import RecordRun, check_resume
from mlsae.trainer.summary import print_summary
from mlsae.trainer.sweep_options import is_sweep

logger = logging.getLogger(__name__)


def run_name(config: RunConfig) -> str:
    """`--run`, or a readable default from the model, expansion factor, k, architecture,
    site and layers."""
    if config.run:
        return config.run
    ae = config.autoencoder
    return names.run_name(
        config.model_name, ae.expansion_factor, ae.k, config.layers, config.site, ae.architecture
    )


def _wandb_logged_in() -> bool:
    """Whether Weights & Biases has credentials: its environment variable, or the entry
    that `wandb login` writes to ~/.netrc (read without importing wandb, which warns)."""
    if os.environ.get("WANDB_MODE") in ("disabled", "offline"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(config: RunConfig, name: str, run_dir: Path) -> Logger | bool:
    """Weights & Biases when asked for or logged in; otherwise a local CSV log."""
    choice = config.trainer.logger
    if choice == "none":
        return False
    if choice == "wandb" or (choice == "auto" and _wandb_logged_in()):
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(name=name, project=config.project, save_dir=str(run_dir))
    if choice == "tensorboard":
        return TensorBoardLogger(str(run_dir), name="tensorboard")
    return CSVLogger(str(run_dir), name="logs")


def model_options(config: RunConfig) -> dict[str, Any]:
    """The constructor arguments of the model that `config` trains."""
    return asdict(config.hyperparameters())


def build_model(config: RunConfig) -> MLSAETransformer:
    return MLSAETransformer(**model_options(config))


def make_trainer(
    config: RunConfig,
    name: str,
    run_dir: Path,
    callbacks: list[Any],
    resumed_epoch: int,
    **overrides: Any,
) -> Trainer:
    """Lightning's trainer for `config` (`overrides`: other `Trainer` arguments)."""
    quiet_lightning()
    trainer_config, data = config.trainer, config.data
    checkpoints = RunCheckpoints(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=trainer_config.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=1,
    )
    trainer = Trainer(
        accelerator=trainer_config.accelerator,
        devices=trainer_config.devices,
        strategy=trainer_config.strategy,
        num_nodes=trainer_config.num_nodes,
        precision=trainer_config.precision or default_precision(),
        logger=make_logger(config, name, run_dir),
        callbacks=[checkpoints, *callbacks],
        plugins=[AtomicCheckpointIO()],
        max_steps=trainer_config.max_steps or -1,
        # The stream is read once (a resumed run continues it), so no text is trained on
        # twice. Its epoch may end before max_steps; the extra epoch yields nothing, and
        # lets a run resumed from the last batch of an epoch continue into the next.
        max_epochs=resumed_epoch + 2,
        accumulate_grad_batches=trainer_config.accumulate_grad_batches,
        log_every_n_steps=trainer_config.log_every_n_steps,
        val_check_interval=trainer_config.val_check_interval,
        check_val_every_n_epoch=None if trainer_config.val_check_interval else 1,
        limit_val_batches=trainer_config.limit_val_batches,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        **overrides,
    )
    if not trainer_config.max_steps:
        # Each process reads every world_size-th micro-batch of the stream.
        per_process = data.max_steps // trainer.world_size
        accumulate = trainer_config.accumulate_grad_batches
        trainer.fit_loop.epoch_loop.max_steps = max(1, math.ceil(per_process / accumulate))
    return trainer


def _stopped(checkpoint: Path, step: int, before: str) -> TrainingInterrupted:
    if checkpoint.is_file():
        return TrainingInterrupted(
            f"Stopped by SIGTERM {before} step {step}: saved {checkpoint}; resume with "
            f"--checkpoint_path {checkpoint} and the same options"
        )
    return TrainingInterrupted(f"Stopped by SIGTERM {before} step {step}: nothing was saved")


def train(config: RunConfig, extra_callbacks: list[Any] | None = None) -> Path:
    """Train an MLSAE and save it with `save_pretrained`; returns the output folder.

    Raises `TrainingInterrupted` when SIGTERM stops the run, after saving `last.ckpt` (or,
    once training is over, the final model). A run that fails leaves no empty folders.
    """
    run_dir = Path(config.trainer.run_dir) / run_name(config)
    try:
        return _train(config, run_dir, extra_callbacks)
    except BaseException:
        remove_empty_folders(run_dir)
        raise


def _train(config: RunConfig, run_dir: Path, extra_callbacks: list[Any] | None) -> Path:
    check_run_config(config)
    initialize(config.seed)
    name = run_name(config)
    checkpoint_dir = run_dir / "checkpoints"
    output_dir = Path(config.trainer.output_dir or run_dir / "model")
    data, trainer_config = config.data, config.trainer
    remove_partials(checkpoint_dir)

    checkpoint_path = trainer_config.checkpoint_path
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    resumed = {} if checkpoint is None else checkpoint.get("mlsae", {})
    sigterm = CheckpointOnSigterm(checkpoint_dir / "last.ckpt")
    callbacks = [sigterm, RecordRun(data), TokensPerSecondBar(), *(extra_callbacks or [])]
    resumed_epoch = 0 if checkpoint is None else checkpoint.get("epoch", 0)
    trainer = make_trainer(config, name, run_dir, callbacks, resumed_epoch)
    if checkpoint is not None:
        check_resume(checkpoint_path, checkpoint, model_options(config), config, trainer.world_size)
        if trainer.is_global_zero:
            prune_orphan_checkpoints(checkpoint_dir, checkpoint, checkpoint_path)
    del checkpoint  # Lightning reads it again in fit; do not hold two copies

    model = build_model(config)
    if checkpoint_path:
        check_transformer(checkpoint_path, resumed, model.transformer)
    tokenizer = load_tokenizer(model.transformer.tokenizer)
    val_blocks = 0 if data.val_path else data.val_blocks
    skipped_blocks = resumed.get("micro_batches_seen", 0) * data.batch_size
    train_loader = data_loader(
        data,
        tokenizer,
        start_block=val_blocks + skipped_blocks,
        stop_block=val_blocks + data.max_steps * data.batch_size,
        single_pass=True,
    )
    val_loader = data_loader(
        data,
        tokenizer,
        stop_block=data.val_blocks,
        path=data.val_path,
        split=data.val_split if data.val_path else None,
    )

    try:
        trainer.fit(model, train_loader, val_loader, ckpt_path=checkpoint_path)
    except SIGTERMException:
        raise _stopped(sigterm.checkpoint_path, trainer.global_step, "before") from None
    if sigterm.interrupted:
        raise _stopped(sigterm.checkpoint_path, trainer.global_step, "after")

    save_trained(trainer, model, val_loader, output_dir)
    return output_dir


def save_trained(
    trainer: Trainer, model: MLSAETransformer, val_loader: Any, output_dir: Path
) -> None:
    """The final validation, then the model saved with `save_pretrained` to `output_dir`;
    `TrainingInterrupted` after saving it when SIGTERM came meanwhile."""
    with DeferredSigterm() as deferred:
        try:
            final = trainer.validate(model, val_loader, verbose=False)
        except SIGTERMException:
            final = None
        if trainer.is_global_zero:
            if final:
                print_summary("Held-out metrics after training", final[0])
                model.held_out_metrics = {name: float(v) for name, v in final[0].items()}
            with atomic_output(output_dir, what="the trained model") as partial:
                model.save_pretrained(partial)
            if trainer.logger is not None and hasattr(trainer.logger, "finalize"):
                trainer.logger.finalize("success")
    if final is None or deferred.received:
        raise TrainingInterrupted(
            f"Stopped by SIGTERM after training ({trainer.global_step} steps), during the "
            f"final validation: saved the trained model to {output_dir}, without its held-out "
            f"metrics (`python test.py --repo_id {output_dir}` computes them)"
        )


def main(args: list[str] | None = None) -> Path:
    """`python train.py`: parse the command line, train, name the saved model last."""
    args = sys.argv[1:] if args is None else list(args)
    if is_sweep(args):
        from mlsae.trainer.sweep import train_sweep

        output_dirs = train_sweep(args)
        for saved in output_dirs:
            print(f"Saved the trained model to {saved}")
        return output_dirs[-1]
    config = parse(RunConfig, args)
    output_dir = train(config)
    print(f"Saved the trained model to {output_dir}")
    return output_dir
