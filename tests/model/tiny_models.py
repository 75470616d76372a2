"""Tiny random causal LMs of each supported family, saved like a hub checkpoint.

`save_tiny_model(family, directory)` writes a randomly initialised model and a byte-level
BPE tokenizer trained in-process (no network) with `save_pretrained`, so that
`Transformer(model_name=str(directory))` loads it as it would a hub id.

Every tokenizer has BOS id 0, EOS id 1 and PAD id 2, except GPT-NeoX's, which has one
`<|endoftext|>` (id 0) for BOS and EOS and no PAD, like Pythia's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB_SIZE = 320
HIDDEN_SIZE = 32
N_LAYERS = 4
MAX_POSITIONS = 64

FAMILIES = ("gpt_neox", "gpt2", "llama", "gemma2", "qwen2")

SEPARATE_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
NEOX_SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}


def _gpt_neox_config(special_ids: dict[str, int | None]) -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=4 * HIDDEN_SIZE,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        **special_ids,
    )


def _gpt2_config(special_ids: dict[str, int | None]) -> PretrainedConfig:
    # Its dropout probabilities stay at 0.1, so a test notices if dropout ever applies.
    return GPT2Config(
        n_embd=HIDDEN_SIZE,
        n_layer=N_LAYERS,
        n_head=4,
        n_positions=MAX_POSITIONS,
        vocab_size=VOCAB_SIZE,
        **special_ids,
    )


def _llama_config(special_ids: dict[str, int | None]) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        **special_ids,
    )


def _gemma2_config(special_ids: dict[str, int | None]) -> PretrainedConfig:
    # A sliding window shorter than the test sequences, so sliding and global layers differ.
    return Gemma2Config(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        **special_ids,
    )


def _qwen2_config(special_ids: dict[str, int | None]) -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        **special_ids,
    )


_BUILDERS: dict[str, tuple[Callable[..., PretrainedConfig], type[PreTrainedModel]]] = {
    "gpt_neox": (_gpt_neox_config, GPTNeoXForCausalLM),
    "gpt2": (_gpt2_config, GPT2LMHeadModel),
    "llama": (_llama_config, LlamaForCausalLM),
    "gemma2": (_gemma2_config, Gemma2ForCausalLM),
    "qwen2": (_qwen2_config, Qwen2ForCausalLM),
}

# Attribute path of each family's final norm, for references computed without it.
FINAL_NORMS = {
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gpt2": "transformer.ln_f",
    "llama": "model.norm",
    "gemma2": "model.norm",
    "qwen2": "model.norm",
}


def _training_text() -> list[str]:
    return [inspect.getdoc(obj) or "" for obj in (str, list, dict, set, int, float, bytes)]


def build_tokenizer(special_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `VOCAB_SIZE` tokens; the special tokens come first."""
    unique_special = list(dict.fromkeys(special_tokens.values()))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=unique_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS, **special_tokens
    )


def build_tiny_model(family: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random model of `family` in eval mode and its tokenizer; the global RNG is untouched."""
    if family not in _BUILDERS:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")
    special_tokens = NEOX_SPECIAL_TOKENS if family == "gpt_neox" else SEPARATE_SPECIAL_TOKENS
    tokenizer = build_tokenizer(special_tokens)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    make_config, model_class = _BUILDERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(make_config(special_ids))
    # Random weights of std 0.02 give near-constant logits; larger ones make tests sharper.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, 0.2)
    return model.eval(), tokenizer


def save_tiny_model(family: str, directory: Path | str, seed: int = 0) -> Path:
    """Save a tiny random model of `family` and its tokenizer to `directory`; return it."""
    directory = Path(directory)
    model, tokenizer = build_tiny_model(family, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
