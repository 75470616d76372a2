"""Reading pickled weights and checkpoints as data: nothing in such a file runs code.

`torch.load` with `weights_only=False` unpickles arbitrary objects, so a crafted `.ckpt` or
`.bin` would run code when loaded. Every such file this library reads goes through
`load_as_data`, which allows tensors, plain containers and numbers, and the one Lightning
type a checkpoint of this library may hold; a file that needs more is refused.
"""

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read, or does not match its module."""


_REFUSED_MARK = "Weights only load failed"


def _safe_globals() -> list[Any]:
    """The non-builtin types that checkpoints of this library may hold."""
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return []
    # Lightning may store the module's hyperparameters as an AttributeDict (a plain dict).
    return [AttributeDict]


def _first_line_with(text: str, word: str) -> str:
    """The first sentence of the first line of `text` that contains `word`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((line for line in lines if word in line.lower()), lines[0] if lines else "")
    return line.split(". ")[0].rstrip(".")


def load_as_data(
    path: str | os.PathLike[str], map_location: Any = "cpu", what: str = "file"
) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, plain containers and numbers only.

    Raises FileNotFoundError when the file does not exist and CheckpointError (one line
    that names the file, as `what`) when it is truncated, corrupt, or needs other objects.
    """
    path = Path(path)
    named = f"{what} {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{named} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _REFUSED_MARK in str(error):
            found = _first_line_with(str(error), "global")
            raise CheckpointError(
                f"refusing to load {named}: it holds Python objects other than tensors and "
                f"plain data ({found}); such files are read as data, never run as code"
            ) from None
        raise CheckpointError(f"cannot read {named}: it is corrupt ({error})") from None
    except Exception as error:
        reason = _first_line_with(str(error), "") or type(error).__name__
        raise CheckpointError(
            f"cannot read {named}: it is corrupt or truncated ({reason})"
        ) from None


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The contents of a Lightning checkpoint written by this library, read by
    `load_as_data`; one that is not such a checkpoint raises CheckpointError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_as_data(path, map_location, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this library")
    return checkpoint
