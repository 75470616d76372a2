"""What a saved folder holds, and where the language model of a saved `MLSAETransformer` is.

Its `config.json` tells the kinds apart: a Hugging Face language model has `architectures`
or `model_type`, an `MLSAETransformer` `model_name` and `expansion_factor`, a plain `MLSAE`
`n_inputs` and `n_latents`.

An `MLSAETransformer` stores its language model as `model_name`. A local folder is stored
relative to the saved model's folder (`portable_path`), so that the two can move together,
and a stored name is found (`find_language_model`) as given from the working directory,
then relative to the model's folder, then as a hub id. docs/models.md says it for users.
"""

import os
from pathlib import Path
from typing import Any

from mlsae.cli import UserError
from mlsae.lm.hub_access import is_hub_id, looks_local

LANGUAGE_MODEL = "language model"

_HOW_TO_LOAD = {
    LANGUAGE_MODEL: (
        "is a Hugging Face language model, not an MLSAE: pass it as --model_name "
        "(model_name= in Python)"
    ),
    "MLSAE": (
        "is a plain MLSAE, without its language model: load it with MLSAE.from_pretrained "
        "(the commands take the -tfm model saved with it)"
    ),
    "MLSAETransformer": (
        "is an MLSAETransformer (an MLSAE with its language model): load it with "
        "MLSAETransformer.from_pretrained (its .autoencoder is the plain MLSAE)"
    ),
}


class WrongKindError(UserError, ValueError):
    """A saved folder of another kind than the class asked to load it."""


class LanguageModelNotFoundError(UserError, FileNotFoundError):
    """The language model that a saved `MLSAETransformer` names is nowhere to be found."""


def saved_kind(config: dict[str, Any]) -> str | None:
    """What a `config.json` describes: `LANGUAGE_MODEL`, `"MLSAETransformer"`, `"MLSAE"`,
    or None when it is none of them."""
    if "architectures" in config or "model_type" in config:
        return LANGUAGE_MODEL
    if "model_name" in config or "expansion_factor" in config:
        return "MLSAETransformer"
    if "n_inputs" in config and "n_latents" in config:
        return "MLSAE"
    return None


def check_kind(config: dict[str, Any], loader: type, source: str) -> None:
    """Raise WrongKindError, saying how to load it, when the folder `source` whose config is
    `config` is of another kind than `loader` (a class or one of its subclasses) loads."""
    kind = saved_kind(config)
    if kind is None or any(base.__name__ == kind for base in loader.__mro__):
        return
    raise WrongKindError(f"{source} {_HOW_TO_LOAD[kind]}")


def find_language_model(stored: str, model_folder: str) -> str:
    """Where the language model `stored` of the model saved in `model_folder` (a folder or
    a hub id) is: `stored` itself when it is a folder from the working directory, else the
    folder `stored` relative to `model_folder`, else `stored` as a hub id.

    Raises LanguageModelNotFoundError when it is none of these, suggesting `model_name=`.
    """
    if os.path.isdir(os.path.expanduser(stored)):
        return stored
    if os.path.isdir(model_folder):
        beside = os.path.normpath(os.path.join(model_folder, os.path.expanduser(stored)))
        if os.path.isdir(beside):
            return beside
    if not looks_local(stored) and is_hub_id(stored):
        return stored
    raise LanguageModelNotFoundError(
        f"cannot find the language model {stored!r} that {model_folder} was trained on: it is "
        f"no folder from the working directory nor from {model_folder}, and no hub id; pass "
        "where it is with --model_name (commands) or model_name= (Python)"
    )


def portable_path(path: str, save_directory: str | os.PathLike[str]) -> str:
    """`path` as a config saved in `save_directory` stores it: an existing local file or
    folder relative to `save_directory` (never absolute), anything else (a hub id) as is."""
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        return path
    try:
        relative = os.path.relpath(os.path.abspath(expanded), os.path.abspath(save_directory))
    except ValueError:  # On another drive (Windows): no relative path exists.
        return path
    return Path(relative).as_posix()
