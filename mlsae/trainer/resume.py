"""Resuming a run: the checkpoint records the run, and a resume with other options is refused.

A checkpoint holds the model's hyperparameters (Lightning's `hyper_parameters`) and, under
`RUN_KEY`, the options of the data stream and the number of processes. A resume compares
every option that changes the model, the data stream or the position in it with those, and
refuses a difference with one line naming each option and both values. Options that only
say how long to train, how often to log, validate or checkpoint, or where outputs go may
change (docs/resuming.md lists both kinds).
"""

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from mlsae.cli import ConfigError
from mlsae.trainer.config import MOVABLE_OPTIONS, DataConfig, RunConfig

logger = logging.getLogger(__name__)

RUN_KEY = "mlsae_run"
"""The checkpoint entry that records the run's data options and number of processes."""

MODEL_OPTIONS = (
    "model_name",
    "layers",
    "site",
    "expansion_factor",
    "k",
    "auxk",
    "auxk_coef",
    "dead_tokens_threshold",
    "dead_threshold",
    "lr",
    "adam_eps",
    "lr_warmup_steps",
    "lr_decay_steps",
    "standardize",
    "skip_special_tokens",
    "count_special_tokens",
    "tuned_lens",
    "architecture",
    "batchtopk_capacity",
    "batchtopk_pool",
    "matryoshka_widths",
    "matryoshka_selection",
    "max_length",
    "batch_size",
    "accumulate_grad_batches",
)
"""Hyperparameters that make another model or another optimisation (`lr` included: a
different learning rate is a different run), compared with the checkpoint's."""

OLDER_CHECKPOINT_VALUES = {
    "site": "resid_post",
    "architecture": "topk",
    "batchtopk_capacity": None,
    "batchtopk_pool": "stack",
    "matryoshka_widths": None,
    "matryoshka_selection": "batchtopk",
}
"""What checkpoints written before these options existed were trained with."""

DATA_OPTIONS = (
    "path",
    "split",
    "text_column",
    "val_path",
    "val_split",
    "val_tokens",
    "skip_bad_documents",
)
"""Data options that make another stream or move the position in it."""


def run_record(data: DataConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint records about the run besides the model's hyperparameters."""
    record: dict[str, Any] = {name: getattr(data, name) for name in DATA_OPTIONS}
    record["max_tokens"] = data.max_tokens
    record["world_size"] = world_size
    return record


class RecordRun(Callback):
    """Writes `run_record` into every checkpoint."""

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_KEY] = run_record(self.data, trainer.world_size)


def _option(name: str) -> str:
    return "-k" if name == "k" else f"--{name}"


def _show(name: str, value: Any) -> str:
    if value is None:
        return "all" if name == "layers" else "none"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "[]"
    return str(value)


def _resolve_layers(layers: list[int] | None, model_name: str) -> list[int] | None:
    """`None` (every block) as the list of blocks, when the model's config can be read."""
    if layers is not None:
        return list(layers)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return list(range(text_config.num_hidden_layers))
    except Exception:
        return None


def _same(name: str, saved: Any, now: Any, model_name: str) -> bool:
    if name == "layers" and (saved is None) != (now is None):
        return _resolve_layers(saved, model_name) == _resolve_layers(now, model_name)
    if isinstance(saved, list | tuple) and isinstance(now, list | tuple):
        return list(saved) == list(now)
    return saved == now


def differences(
    checkpoint: dict[str, Any],
    model_options: dict[str, Any],
    config: RunConfig,
    world_size: int,
) -> list[str]:
    """`--option was <saved>, now <value>` for every option of `config` that differs from
    the run that wrote the checkpoint (options in `config.trainer.moved` excepted)."""
    saved_model = {**OLDER_CHECKPOINT_VALUES, **(checkpoint.get("hyper_parameters") or {})}
    moved = set(config.trainer.moved or ())
    found = []
    for name in MODEL_OPTIONS:
        if name in moved or name not in saved_model or name not in model_options:
            continue
        if not _same(name, saved_model[name], model_options[name], config.model_name):
            found.append((name, saved_model[name], model_options[name]))
    record = checkpoint.get(RUN_KEY)
    if record is not None:
        now = run_record(config.data, world_size)
        for name in DATA_OPTIONS:
            if name in moved or name not in record:
                continue
            if name == "val_tokens" and config.data.val_path is not None:
                continue  # with separate validation data, val_tokens moves nothing
            if record[name] != now[name]:
                found.append((name, record[name], now[name]))
        if record.get("world_size", world_size) != world_size:
            found.append(("devices (processes)", record["world_size"], world_size))
    return [
        f"{_option(name)} was {_show(name, saved)}, now {_show(name, now)}"
        for name, saved, now in found
    ]


def check_resume(
    checkpoint_path: str | Path,
    checkpoint: dict[str, Any],
    model_options: dict[str, Any],
    config: RunConfig,
    world_size: int,
) -> None:
    """Refuse to resume `checkpoint` with options that make another run; note the changes
    that are allowed but worth knowing."""
    found = differences(checkpoint, model_options, config, world_size)
    if found:
        movable = [
            name for name in MOVABLE_OPTIONS if any(f.startswith(f"--{name} ") for f in found)
        ]
        hint = f" (if the files only moved, add --moved {' '.join(movable)})" if movable else ""
        raise ConfigError(
            f"cannot resume from {checkpoint_path}, which a run with other options wrote "
            f"({'; '.join(found)}): resume with the checkpoint's options{hint}, or start a "
            "new run with another --run"
        )
    if RUN_KEY not in checkpoint:
        logger.warning(
            "%s records no data options (it predates that record): only the model's "
            "options were compared with this run's",
            checkpoint_path,
        )
        return
    saved_tokens = checkpoint[RUN_KEY].get("max_tokens")
    lr_decay = model_options.get("lr_decay_steps")
    if lr_decay and saved_tokens is not None and saved_tokens != config.data.max_tokens:
        logger.warning(
            "--max_tokens changed from %s to %s: the learning rate's final decay "
            "(--lr_decay_steps %s) now ends at the new last step",
            saved_tokens,
            config.data.max_tokens,
            lr_decay,
        )
