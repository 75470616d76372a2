"""What the explorer says about the model it serves: a pretrained MLSAE, or a stack of
per-layer SAEs (`mlsae.analysis.source.StackSource`)."""

from typing import Any

from mlsae.analysis.prompt import PromptModel
from mlsae.analysis.source import StackSource


def latents_per_position(model: PromptModel) -> int:
    """The most latents that one layer and position can show: an MLSAE's k; for a stack,
    whose SAEs fire a varying number, the largest `d_sae`."""
    return model.n_latents if isinstance(model, StackSource) else model.k


def hparams(model: PromptModel) -> dict[str, Any]:
    """An MLSAE's hyperparameters; for a stack, its transformer and SAEs."""
    if not isinstance(model, StackSource):
        return dict(model.hparams_initial)
    return {
        "model_name": model.model_name,
        "saes": list(model.stack.names),
        "layers": list(model.layers),
        "sites": list(model.sites),
        "formats": [sae.format for sae in model.stack],
        "d_sae": [sae.d_sae for sae in model.stack],
        "count_special_tokens": model.count_special_tokens,
    }


def model_params(model: PromptModel) -> dict[str, Any]:
    """The fields of `schemas.Params` that describe the model."""
    stack = isinstance(model, StackSource)
    return {
        "model_name": model.model_name,
        "blocks": list(model.layers),
        "d_model": model.transformer.d_model if stack else model.n_inputs,
        "standardize": False if stack else model.standardize,
        "tuned_lens": False if stack else model.lens is not None,
        "hparams": hparams(model),
    }
