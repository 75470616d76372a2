"""Lightning checkpoints of this library: read as data (`mlsae.files.load_as_data`), so
nothing in a checkpoint file runs code; the frozen transformer recorded by fingerprint
rather than by its weights."""

import os
from pathlib import Path
from typing import Any

import torch

from mlsae.files import CheckpointError, load_as_data

__all__ = [
    "CheckpointError",
    "check_transformer",
    "leave_out_transformer",
    "leaves_out_transformer",
    "load_as_data",
    "read_checkpoint",
    "restore_transformer",
]


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The contents of a Lightning checkpoint written by this library, read by
    `load_as_data`; one that is not such a checkpoint raises CheckpointError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_as_data(path, map_location, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this library")
    return checkpoint


TRANSFORMER_PREFIX = "transformer."
FINGERPRINT_KEY = "transformer_fingerprint"


def leave_out_transformer(transformer: Any, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen transformer's weights from a checkpoint being saved, recording their
    fingerprint in `checkpoint["mlsae"]` instead: they are the weights the run loaded and
    never changes, so each checkpoint is smaller by the whole language model. A transformer
    built without weights of its own (no fingerprint) stays in."""
    if transformer.fingerprint is None:
        return
    state = checkpoint["state_dict"]
    for key in [key for key in state if key.startswith(TRANSFORMER_PREFIX)]:
        del state[key]
    checkpoint.setdefault("mlsae", {})[FINGERPRINT_KEY] = transformer.fingerprint


def leaves_out_transformer(checkpoint: dict[str, Any]) -> bool:
    """Whether `checkpoint` records its transformer by fingerprint, not by weights."""
    state = checkpoint["state_dict"]
    recorded = FINGERPRINT_KEY in (checkpoint.get("mlsae") or {})
    return recorded and not any(key.startswith(TRANSFORMER_PREFIX) for key in state)


def check_transformer(
    source: str | os.PathLike[str], checkpoint_state: dict[str, Any], transformer: Any
) -> None:
    """Raise CheckpointError unless `transformer` holds the weights whose fingerprint the
    checkpoint `source` recorded (`checkpoint_state` is its `checkpoint["mlsae"]`); a
    checkpoint that holds the weights themselves passes."""
    recorded = (checkpoint_state or {}).get(FINGERPRINT_KEY)
    if recorded is None or recorded == transformer.fingerprint:
        return
    raise CheckpointError(
        f"{source} was trained on other weights than those of {transformer.model_name} "
        "(their fingerprints differ): load the language model that the run trained on"
    )


def restore_transformer(
    module: torch.nn.Module, checkpoint: dict[str, Any], source: str | os.PathLike[str]
) -> None:
    """Put the module's own transformer weights into a checkpoint being loaded that left
    them out (`leave_out_transformer`), after checking they are the ones it recorded, so
    that it loads strictly.

    A checkpoint that holds other transformer weights than the module's (written before
    checkpoints left them out, under another precision, or from another model) loads
    them, and the module's later checkpoints hold its weights too: no fingerprint of
    the loaded model describes them."""
    own = module.transformer.state_dict(prefix=TRANSFORMER_PREFIX)
    state = checkpoint["state_dict"]
    if not leaves_out_transformer(checkpoint):
        held = {key: value for key, value in state.items() if key.startswith(TRANSFORMER_PREFIX)}
        if held.keys() != own.keys() or not all(
            value.dtype == own[key].dtype and torch.equal(value, own[key])
            for key, value in held.items()
        ):
            module.transformer.fingerprint = None
        return
    check_transformer(source, checkpoint["mlsae"], module.transformer)
    state.update(own)
