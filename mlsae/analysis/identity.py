"""Which model wrote an analysis output, so that no reader takes another model's.

Outputs are named after the model (`out/<name>-examples.db`), and two models can share
a name: two local models saved as `.../<run>/model`, or a retrain under the same run.
So each output that is read back records its `OutputOrigin`: the identity of the model
that wrote it (`model_identity`), or the published dataset it was imported from. A
reader given a model refuses an output of another model (`check_origin`); an analysis
replaces it, saying so (`replacement_note`). docs/analysis-outputs.md has the rules.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from mlsae.lm.fingerprint import hash_sample

logger = logging.getLogger(__name__)

_METADATA_PREFIX = "mlsae."


class OutputOfAnotherModelError(ValueError):
    """An analysis output that another model wrote."""


@dataclass(frozen=True)
class OutputOrigin:
    """What wrote an analysis output."""

    model: str | None = None
    """The identity of the model that wrote it (`model_identity`), if a model did."""

    repo_id: str | None = None
    """The model as the analysis was given it (hub id or local folder)."""

    imported_from: str | None = None
    """The dataset (hub id or local rows) that it was imported from, if it was."""

    def to_metadata(self) -> dict[str, str]:
        """As string metadata (e.g. of a safetensors file), the unset fields left out."""
        fields = {"model": self.model, "repo_id": self.repo_id, "imported_from": self.imported_from}
        return {_METADATA_PREFIX + key: value for key, value in fields.items() if value}

    @staticmethod
    def from_metadata(metadata: dict[str, str] | None) -> "OutputOrigin | None":
        """From `to_metadata`'s fields; None when none is there (an older output)."""
        metadata = metadata or {}
        fields = {
            key: metadata.get(_METADATA_PREFIX + key)
            for key in ("model", "repo_id", "imported_from")
        }
        return OutputOrigin(**fields) if any(fields.values()) else None

    def describe(self) -> str:
        if self.imported_from:
            return f"imported from {self.imported_from}"
        return f"written by {self.repo_id or 'a model'} (model {(self.model or '?')[:12]})"


def read_safetensors_origin(path: str | os.PathLike[str]) -> OutputOrigin | None:
    """What wrote the safetensors file at `path`, from its metadata; None when it does
    not say (or there is no file)."""
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as file:
        return OutputOrigin.from_metadata(file.metadata())


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    header = {"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    digest.update(json.dumps(header).encode())
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(flat.view(torch.uint8).numpy().data)


def model_identity(model: Any) -> str:
    """A SHA-256 (hex) that tells `MLSAETransformer`s apart by what their latents are.

    An analysis records latents, and those follow from the transformer's residual stream
    at `layers`, the autoencoder's weights and `k`, and the tuned lens, if any. So the
    identity hashes the autoencoder's and the lens's parameters (names, dtypes, shapes
    and bytes), `k` and the layers, and a sample of the transformer's weights
    (`mlsae.lm.fingerprint.hash_sample`), which does not depend on the folder or hub id
    the transformer was loaded from. Buffers (such as the dead-latent counters) change no
    latent and are left out, so a model keeps its identity however often it is saved.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"layers": list(model.layers), "k": model.k}).encode())
    for name, parameter in sorted(model.transformer.model.named_parameters()):
        hash_sample(digest, f"transformer.{name}", parameter)
    modules = {"autoencoder": model.autoencoder, "lens": getattr(model, "lens", None)}
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, parameter in sorted(module.named_parameters()):
            _hash_tensor(digest, f"{prefix}.{name}", parameter)
    return digest.hexdigest()


_SIMPLE = (int, float, str, bool, type(None))


def stack_identity(stack: Any, transformer: Any) -> str:
    """A SHA-256 (hex) that tells stacks of per-layer SAEs apart by what their latents are.

    Like `model_identity`: every SAE's parameters (names, dtypes, shapes and bytes), where
    it reads (layer, site), its format and its settings that are not tensors (such as a
    top-k SAE's `k` and its input normalisation), and a sample of the transformer's
    weights.
    """
    digest = hashlib.sha256()
    for position, sae in enumerate(stack):
        settings = {
            name: value
            for name, value in sorted(vars(sae).items())
            if isinstance(value, _SIMPLE) and not name.startswith("_") and name != "training"
        }
        header = {"format": sae.format, "class": type(sae).__name__, **settings}
        digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        normalisation = getattr(sae, "normalisation", None)
        if normalisation is not None:
            digest.update(repr(normalisation).encode())
        for name, parameter in sorted(sae.named_parameters()):
            _hash_tensor(digest, f"sae.{position}.{name}", parameter)
    for name, parameter in sorted(transformer.named_parameters()):
        hash_sample(digest, f"transformer.{name}", parameter)
    return digest.hexdigest()


def source_identity(source: Any) -> str | None:
    """The identity of the model behind a `LatentSource`; None when it has none."""
    stack = getattr(source, "stack", None)
    if stack is not None:
        return stack_identity(stack, source.transformer.model)
    model = getattr(source, "model", None)
    if model is None or not hasattr(model, "autoencoder"):
        return None
    return model_identity(model)


def resolve_identity(model: Any) -> str:
    """The identity of `model`: an `MLSAETransformer`, or an identity already computed."""
    return model if isinstance(model, str) else model_identity(model)


def check_origin(
    path: str | os.PathLike[str],
    origin: OutputOrigin | None,
    identity: str,
    *,
    dataset_id: str | None,
    rerun: str,
) -> None:
    """Refuse the output at `path` unless the model of `identity` may read it.

    It may when the output records that identity; when it was imported from
    `dataset_id` (the published dataset of this model), or from anything when
    `dataset_id` is None (an output the user named); and, with a warning, when it
    records no origin (written before outputs recorded one). `rerun` says how to
    rebuild it.
    """
    if origin is None:
        logger.warning(
            "%s records no model (it was written before analysis outputs did): it cannot be "
            "checked against this model; %s to record it",
            path,
            rerun,
        )
        return
    if origin.model is not None:
        if origin.model == identity:
            return
    elif origin.imported_from is not None and dataset_id in (None, origin.imported_from):
        return
    raise OutputOfAnotherModelError(
        f"{path} holds the output of another model ({origin.describe()}, not model "
        f"{identity[:12]}): {rerun} to rebuild it"
    )


def replacement_note(
    path: str | os.PathLike[str], previous: OutputOrigin | None, origin: OutputOrigin
) -> str | None:
    """The line an analysis prints when its output replaces another model's, else None."""
    if previous is None or previous.model is None or origin.model is None:
        return None
    if previous.model == origin.model:
        return None
    return f"Replaced {path}, an output of another model ({previous.describe()})"
