"""What the wrapper needs to know of any Hugging Face causal LM: where its decoder blocks
are, which layers exist, its special tokens, and its checkpoint names."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mlsae.lm.hub_access import language_model_options

# Module names that transformers renamed, as (published checkpoint name, other name). Keys
# are accepted under either name on load and saved under the published one, so checkpoints
# stay loadable by the original code. transformers 5 calls GPT-NeoX's head `lm_head`; the
# published `-tfm` checkpoints hold `transformer.model.embed_out.weight`.
_RENAMED_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (("embed_out.", "lm_head."),),
}


def find_decoder_blocks(model: nn.Module, n_blocks: int) -> str:
    """The name in `model` of the `nn.ModuleList` of its `n_blocks` decoder blocks.

    It is the shallowest `ModuleList` of `n_blocks` modules of one class (for example
    `gpt_neox.layers`, `transformer.h` or `model.layers`).
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n_blocks > 0
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"Unsupported architecture {type(model).__name__}: found no nn.ModuleList of its "
            f"{n_blocks} decoder blocks (config num_hidden_layers)."
        )
    depth = min(name.count(".") for name, _ in candidates)
    shallowest = [(name, module) for name, module in candidates if name.count(".") == depth]
    if len(shallowest) > 1:
        names = ", ".join(name for name, _ in shallowest)
        raise ValueError(
            f"Unsupported architecture {type(model).__name__}: several lists of {n_blocks} "
            f"blocks could be its decoder blocks ({names})."
        )
    return shallowest[0][0]


def validate_layers(layers: list[int] | None, n_blocks: int) -> list[int]:
    """The selected block indices: all blocks if None, else `layers` after checks."""
    if layers is None:
        return list(range(n_blocks))
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one block (or be None for all blocks).")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers must be block indices (ints), got {layer!r}.")
        if not 0 <= layer < n_blocks:
            raise ValueError(f"Layer {layer} is out of range: the model has {n_blocks} blocks.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a block, got {layers}.")
    return layers


def build_model(
    model_name: str, load_weights: bool, dtype: torch.dtype, attn_implementation: str | None
) -> PreTrainedModel:
    """The causal LM `model_name` (a local folder or a hub id), with its weights or, without
    `load_weights`, with random ones. A missing local folder, or a hub model that the hub
    cannot give, raises at once (see `mlsae.lm.hub_access`)."""
    hub_options = language_model_options(model_name)
    model_name = os.path.expanduser(model_name)
    # transformers renamed `torch_dtype` to `dtype` in 4.56.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if load_weights:
            return AutoModelForCausalLM.from_pretrained(model_name, **kwargs, **hub_options)
        config = AutoConfig.from_pretrained(model_name, **hub_options)
    except OSError as error:
        raise OSError(
            f"cannot load the language model {model_name!r}: {error}; pass a hub id or a local "
            "folder as --model_name (model_name= in Python)"
        ) from error
    # Random initialisation would otherwise advance the global RNG, which loading weights
    # does not: seeded runs must not depend on how the model was built. `from_config` reads
    # no files, so the hub options stay out of it (it rejects them).
    with torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def load_pretrained_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the language model `model_name` (from the cache only without the
    hub; see `build_model`)."""
    hub_options = language_model_options(model_name)
    return AutoTokenizer.from_pretrained(os.path.expanduser(model_name), **hub_options)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({token_id for token_id in ids if token_id is not None})


def _renamed_modules(module: Any) -> tuple[tuple[str, str], ...]:
    return _RENAMED_MODULES.get(getattr(module.config, "model_type", ""), ())


def save_published_module_names(
    module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    model_prefix = prefix + "model."
    for published, other in _renamed_modules(module):
        for key in [key for key in state_dict if key.startswith(model_prefix + other)]:
            new_key = model_prefix + published + key[len(model_prefix + other) :]
            state_dict[new_key] = state_dict.pop(key)


def accept_renamed_module_names(
    module: Any, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    model_prefix = prefix + "model."
    own_keys = set(module.model.state_dict().keys())
    for published, other in _renamed_modules(module):
        for old, new in ((published, other), (other, published)):
            for key in [key for key in state_dict if key.startswith(model_prefix + old)]:
                name = key[len(model_prefix) :]
                new_name = new + name[len(old) :]
                if name not in own_keys and new_name in own_keys:
                    state_dict[model_prefix + new_name] = state_dict.pop(key)
