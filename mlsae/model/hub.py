"""Strict loading for modules saved with `huggingface_hub.PyTorchModelHubMixin`.

The mixin loads weights with `strict=False` by default, which silently leaves
random weights behind when a tensor is missing. Here every tensor of the module
must be in the file and every tensor in the file must belong to the module,
except for the keys a class declares optional.
"""

import contextvars
import inspect
import json
import logging
import os
import re
import types
import typing
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin, constants
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from mlsae.cli import ConfigError
from mlsae.files import CheckpointError, load_as_data
from mlsae.lm.hub_access import hub_file, is_local, offline_reason, require_local
from mlsae.model.checkpoint import read_checkpoint
from mlsae.model.resolve import check_kind, portable_path

logger = logging.getLogger(__name__)

# While a module is built to receive a checkpoint's weights: "all" of them, or "trainable"
# ones only (a checkpoint that records frozen weights by fingerprint); None otherwise.
_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "weights_from_checkpoint", default=None
)


def _format_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strictly(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    optional: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> None:
    """Load `state_dict` into `module`, failing on missing or unexpected tensors.

    `optional` and `ignored` are regular expressions matched against full keys:
    optional keys may be missing from the file, ignored keys may be present in
    the file and are dropped. Shapes must agree.
    """
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if not any(re.fullmatch(pattern, key) for pattern in ignored)
    }
    expected = module.state_dict()
    missing = [
        key
        for key in expected
        if key not in state_dict and not any(re.fullmatch(p, key) for p in optional)
    ]
    unexpected = [key for key in state_dict if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_format_keys(unexpected)}")
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in state_dict
        if key in expected and state_dict[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(
            f"tensors whose shape disagrees with the config: {_format_keys(mismatched)}"
        )
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(state_dict, strict=False)


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


_DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "token", "local_files_only")


def download_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options of `from_pretrained`'s `kwargs` that say how to download from the hub."""
    return {key: kwargs[key] for key in _DOWNLOAD_OPTIONS if key in kwargs}


def read_config(model_id: str, **download_kwargs: Any) -> dict[str, Any]:
    """The `config.json` of a saved module, from a local folder or the hub."""
    return _read_json_object(_resolve_file(model_id, constants.CONFIG_NAME, **download_kwargs))


def _resolve_file(model_id: str, filename: str, **download_kwargs: Any) -> str:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{filename} not found in {Path(model_id).resolve()}")
        return path
    require_local(model_id, "the model folder")
    return hub_file(model_id, filename, "the MLSAE", **download_kwargs)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a constructor annotation (int, float, bool, str, None,
    lists and unions of these)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class StrictHubMixin(PyTorchModelHubMixin):
    """`PyTorchModelHubMixin` with strict loading and checked config files.

    Subclasses list regular expressions for the state-dict keys that may be
    missing (`_optional_keys`) or that are dropped when present (`_ignored_keys`).
    """

    _optional_keys: ClassVar[tuple[str, ...]] = ()
    _ignored_keys: ClassVar[tuple[str, ...]] = ()
    _new_config_keys: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that configs written by the original code never hold."""
    _local_path_keys: ClassVar[tuple[str, ...]] = ()
    """Config keys that may name local files or folders: saved relative to the saved
    folder (see `mlsae.model.resolve.portable_path`), and never pushed to the hub."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """Load a module saved with `save_pretrained`, locally or from the hub (from the
        cache only when the hub cannot be reached).

        A folder of another kind (a language model, an MLSAE for an MLSAETransformer, ...)
        raises, saying how to load it. Unknown config keys give a warning and missing ones
        their defaults; a required one that is missing raises. Weights are loaded strictly.
        """
        model_id = os.path.expanduser(str(pretrained_model_name_or_path))
        if not os.path.isdir(model_id) and offline_reason() is not None:
            kwargs["local_files_only"] = True
        config_path = _resolve_file(model_id, constants.CONFIG_NAME, **download_options(kwargs))
        config = _read_json_object(config_path)
        check_kind(config, cls, model_id)
        cls._check_config(config, source=config_path)
        return super().from_pretrained(model_id, **kwargs)

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None, **kwargs: Any):
        """`PyTorchModelHubMixin.save_pretrained`, with the local paths that the config holds
        (`_local_path_keys`) written relative to `save_directory`."""
        return super().save_pretrained(
            save_directory, config=self._config_to_save(save_directory, config), **kwargs
        )

    def push_to_hub(self, repo_id: str, *, config: Any = None, **kwargs: Any) -> str:
        """`PyTorchModelHubMixin.push_to_hub`, refused when the config names local paths
        (`_local_path_keys`), which nobody else can load: pass `config=` with hub ids."""
        pushed = self._config_to_save(None, config) or {}
        local = [
            f"{key}={pushed[key]!r}"
            for key in self._local_path_keys
            if isinstance(pushed.get(key), str) and is_local(pushed[key])
        ]
        if local:
            raise ConfigError(
                f"will not push {repo_id}: its config names local paths ({', '.join(local)}), "
                "which nobody else can load; pass config= with hub ids instead (upload.py "
                "--model_name does it for the language model)"
            )
        return super().push_to_hub(repo_id, config=config, **kwargs)

    def _config_to_save(
        self, save_directory: str | Path | None, config: Any
    ) -> dict[str, Any] | None:
        config = self._hub_mixin_config if config is None else config
        if config is None or not self._local_path_keys:
            return config
        config = asdict(config) if is_dataclass(config) else dict(config)
        if save_directory is not None:
            for key in self._local_path_keys:
                if isinstance(config.get(key), str):
                    config[key] = portable_path(config[key], save_directory)
        return config

    @classmethod
    def _check_config(cls, config: dict[str, Any], source: str) -> None:
        parameters = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(config) - set(parameters))
        if unknown:
            warnings.warn(
                f"{source}: ignoring config keys unknown to {cls.__name__}: {', '.join(unknown)}",
                stacklevel=3,
            )
        required = [
            name
            for name, parameter in parameters.items()
            if name != "self"
            and parameter.default is inspect.Parameter.empty
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]
        missing = [name for name in required if name not in config]
        if missing:
            raise CheckpointError(f"{source} is missing required keys: {', '.join(missing)}")
        defaulted = [
            f"{name}={parameter.default!r}"
            for name, parameter in parameters.items()
            if name not in cls._new_config_keys
            and name not in config
            and name not in required
            and name != "self"
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]
        if defaulted:
            warnings.warn(
                f"{source} lacks config keys, which take their defaults: {', '.join(defaulted)}",
                stacklevel=3,
            )
        hints = {
            name: parameter.annotation
            for name, parameter in parameters.items()
            if parameter.annotation is not inspect.Parameter.empty
        }
        wrong = [
            f"{name}={value!r} (expected {_describe(hints[name])})"
            for name, value in config.items()
            if name in hints and not _matches(value, hints[name])
        ]
        if wrong:
            raise CheckpointError(f"{source} has values of the wrong type: {', '.join(wrong)}")

    @staticmethod
    def weights_from_checkpoint() -> bool:
        """True while a module is built to receive a checkpoint's weights (by
        `from_pretrained` or `load_lightning_checkpoint`): a constructor that would
        otherwise load or initialise weights of its own may skip that."""
        return _WEIGHTS_FROM_CHECKPOINT.get() is not None

    @staticmethod
    def frozen_weights_from_checkpoint() -> bool:
        """Like `weights_from_checkpoint`, for the frozen weights: False where the
        checkpoint records them by fingerprint only, so that the module loads its own."""
        return _WEIGHTS_FROM_CHECKPOINT.get() == "all"

    @classmethod
    def frozen_weights_left_out(cls, checkpoint: dict[str, Any]) -> bool:
        """Whether a Lightning checkpoint of this module leaves its frozen weights out."""
        return False

    @classmethod
    def _build_for_checkpoint(cls, frozen_included: bool = True, **kwargs: Any):
        token = _WEIGHTS_FROM_CHECKPOINT.set("all" if frozen_included else "trainable")
        try:
            return cls(**kwargs)
        finally:
            _WEIGHTS_FROM_CHECKPOINT.reset(token)

    @classmethod
    def load_lightning_checkpoint(cls, ckpt_path: str | Path, map_location: str = "cpu"):
        """A module from a Lightning checkpoint of it (its `hyper_parameters` and
        `state_dict`), read as data and loaded strictly after the module's
        `on_load_checkpoint` (where it has one) has seen it, as Lightning orders them."""
        checkpoint = read_checkpoint(ckpt_path, map_location)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict):
            raise CheckpointError(f"{ckpt_path} holds no hyperparameters of {cls.__name__}")
        cls._check_config(dict(hparams), source=str(ckpt_path))
        frozen_included = not cls.frozen_weights_left_out(checkpoint)
        model = cls._build_for_checkpoint(frozen_included, **hparams)
        if hasattr(model, "on_load_checkpoint"):
            try:
                model.on_load_checkpoint(checkpoint)
            except CheckpointError as error:
                raise CheckpointError(f"{ckpt_path}: {error}") from None
        load_state_dict_strictly(
            model,
            checkpoint["state_dict"],
            optional=cls._optional_keys,
            ignored=cls._ignored_keys,
            source=str(ckpt_path),
        )
        return model.eval()

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ):
        model = cls._build_for_checkpoint(**model_kwargs)
        download_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        try:
            path = _resolve_file(model_id, constants.SAFETENSORS_SINGLE_FILE, **download_kwargs)
            state_dict = cls._read_safetensors(path, map_location)
        except (FileNotFoundError, EntryNotFoundError):
            path = _resolve_file(model_id, constants.PYTORCH_WEIGHTS_NAME, **download_kwargs)
            state_dict = load_as_data(path, map_location, what="weights file")
        if strict:
            load_state_dict_strictly(
                model,
                state_dict,
                optional=cls._optional_keys,
                ignored=cls._ignored_keys,
                source=path,
            )
        else:
            result = model.load_state_dict(state_dict, strict=False)
            if result.missing_keys or result.unexpected_keys:
                logger.warning("Loaded %s non-strictly: %s", path, result)
        model.eval()
        return model

    @staticmethod
    def _read_safetensors(path: str, map_location: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
