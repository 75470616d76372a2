"""Reading Lightning checkpoints of this library as data (`mlsae.files.load_as_data`):
nothing in a checkpoint file runs code."""

import os
from pathlib import Path
from typing import Any

from mlsae.files import CheckpointError, load_as_data

__all__ = ["CheckpointError", "load_as_data", "read_checkpoint"]


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The contents of a Lightning checkpoint written by this library, read by
    `load_as_data`; one that is not such a checkpoint raises CheckpointError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_as_data(path, map_location, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this library")
    return checkpoint
