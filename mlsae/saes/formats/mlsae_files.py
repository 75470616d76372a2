"""Reading the autoencoder of a saved `MLSAE` folder, or of a saved `MLSAETransformer`
(`-tfm`) folder without its language model: only the `autoencoder.*` tensors of its weights
file are read, and the blocks it was trained on come from its config (or, where that says
all of them, from the names of the language model's tensors in the same file)."""

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mlsae.cli import ConfigError
from mlsae.files import CheckpointError, load_as_data
from mlsae.model.autoencoder import MLSAE
from mlsae.model.hparams import MLSAEHyperparameters
from mlsae.model.hub import load_state_dict_strictly
from mlsae.model.resolve import WrongKindError
from mlsae.saes.registry import SAEFileError

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""The weights files `save_pretrained` writes, in the order `from_pretrained` reads them."""

AUTOENCODER = "autoencoder."
"""The prefix of the autoencoder's tensors in an `MLSAETransformer`'s weights."""

_BLOCK_KEY = re.compile(r"transformer\.model\.(.+?)\.(\d+)\.")
"""A tensor of one decoder block of the language model: `(list path, block index)`."""


def weights_file(folder: Path) -> Path:
    """The weights file of the saved model in `folder`."""
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise SAEFileError(
        f"{folder} holds the config.json of an MLSAE but no weights ({' or '.join(WEIGHTS)})"
    )


def read_plain(folder: Path) -> MLSAE:
    """The plain `MLSAE` saved in `folder`, loaded strictly by `MLSAE.from_pretrained`."""
    weights_file(folder)
    try:
        return MLSAE.from_pretrained(str(folder))
    except (CheckpointError, WrongKindError) as error:
        raise SAEFileError(str(error)) from None


def read_transformer(folder: Path, config: dict[str, Any]) -> tuple[MLSAE, list[int] | None]:
    """The autoencoder of the `MLSAETransformer` saved in `folder` (whose `config.json` is
    `config`), and the blocks it was trained on (None where the files do not say)."""
    file = folder / "config.json"
    hparams = transformer_hparams(file, config)
    if hparams["tuned_lens"]:
        raise SAEFileError(
            f"{file}: this MLSAE reads the residual stream through a tuned lens, which the "
            "SAE interface does not apply; load it with MLSAETransformer.from_pretrained"
        )
    weights = weights_file(folder)
    tensors, keys = autoencoder_tensors(weights)
    autoencoder = build_autoencoder(file, hparams, input_width(weights, tensors))
    try:
        load_state_dict_strictly(
            autoencoder,
            tensors,
            optional=MLSAE._optional_keys,
            ignored=MLSAE._ignored_keys,
            source=f"{weights} ({AUTOENCODER}*)",
        )
    except CheckpointError as error:
        raise SAEFileError(str(error)) from None
    saved = hparams["layers"]
    if saved is None:
        n_blocks = count_blocks(keys)
        saved = None if n_blocks is None else list(range(n_blocks))
    return autoencoder.eval(), saved


def transformer_hparams(file: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of `config`, defaults where it lacks them, with the types the
    autoencoder needs checked."""
    hparams = asdict(MLSAEHyperparameters())
    hparams.update({key: value for key, value in config.items() if key in hparams})
    expansion = hparams["expansion_factor"]
    if not isinstance(expansion, int) or isinstance(expansion, bool) or expansion <= 0:
        raise SAEFileError(
            f"{file}: expansion_factor must be a positive integer, not {expansion!r}"
        )
    for name in ("standardize", "tuned_lens"):
        if not isinstance(hparams[name], bool):
            raise SAEFileError(f"{file}: {name} must be true or false, not {hparams[name]!r}")
    layers = hparams["layers"]
    if layers is not None and not (
        isinstance(layers, list)
        and layers
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
    ):
        raise SAEFileError(
            f"{file}: layers must be null or a list of block indices, not {layers!r}"
        )
    return hparams


def autoencoder_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The autoencoder's tensors of `weights` (without their prefix), and every key of it;
    from a safetensors file, only those tensors are read."""
    try:
        if weights.suffix == ".safetensors":
            with safe_open(str(weights), framework="pt") as file:
                keys = list(file.keys())
                tensors = {
                    key.removeprefix(AUTOENCODER): file.get_tensor(key)
                    for key in keys
                    if key.startswith(AUTOENCODER)
                }
        else:
            state = load_as_data(weights, what="weights file")
            if not isinstance(state, dict):
                raise SAEFileError(f"{weights} holds no state dict")
            keys = [str(key) for key in state]
            tensors = {
                key.removeprefix(AUTOENCODER): value
                for key, value in state.items()
                if isinstance(key, str) and key.startswith(AUTOENCODER)
            }
    except (SafetensorError, OSError, CheckpointError) as error:
        raise SAEFileError(f"cannot read {weights}: {error}") from None
    if not tensors:
        raise SAEFileError(
            f"{weights} holds no {AUTOENCODER}* tensors (found: {', '.join(keys[:8]) or 'none'})"
        )
    return tensors, keys


def input_width(weights: Path, tensors: dict[str, torch.Tensor]) -> int:
    """The autoencoder's input width (the language model's d_model), from its tensors."""
    encoder, bias = tensors.get("encoder.weight"), tensors.get("pre_encoder_bias")
    if isinstance(encoder, torch.Tensor) and encoder.ndim == 2:
        return encoder.shape[1]
    if isinstance(bias, torch.Tensor) and bias.ndim == 1:
        return bias.shape[0]
    raise SAEFileError(
        f"{weights} lacks {AUTOENCODER}encoder.weight [n_latents, n_inputs] "
        f"(its {AUTOENCODER}* tensors: {', '.join(sorted(tensors)[:8])})"
    )


def build_autoencoder(file: Path, hparams: dict[str, Any], n_inputs: int) -> MLSAE:
    """An `MLSAE` of `hparams` for inputs of width `n_inputs`, as `MLSAETransformer`
    builds it."""
    try:
        return MLSAE(
            n_inputs,
            n_inputs * hparams["expansion_factor"],
            hparams["k"],
            hparams["dead_steps_threshold"],
            hparams["dead_threshold"],
            hparams["auxk"],
            hparams["standardize"],
            dead_tokens_threshold=hparams["dead_tokens_threshold"],
            architecture=hparams["architecture"],
            batchtopk_capacity=hparams["batchtopk_capacity"],
            batchtopk_pool=hparams["batchtopk_pool"],
            matryoshka_widths=hparams["matryoshka_widths"],
            matryoshka_selection=hparams["matryoshka_selection"],
        )
    except (ValueError, TypeError, ConfigError) as error:
        raise SAEFileError(f"{file}: {error}") from None


def count_blocks(keys: Iterable[str]) -> int | None:
    """How many decoder blocks the language model whose tensors are among `keys` has: the
    shallowest numbered list of modules (as `mlsae.lm.architecture.find_decoder_blocks`
    finds them), or None when that is not clear."""
    lists: dict[str, set[int]] = defaultdict(set)
    for key in keys:
        if match := _BLOCK_KEY.match(key):
            lists[match.group(1)].add(int(match.group(2)))
    if not lists:
        return None
    depth = min(path.count(".") for path in lists)
    shallowest = [indices for path, indices in lists.items() if path.count(".") == depth]
    if len(shallowest) != 1 or shallowest[0] != set(range(len(shallowest[0]))):
        return None
    return len(shallowest[0])
