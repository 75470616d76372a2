"""Record what TransformerLens computes at each site of tiny random models, for
`tests/lm/test_transformer_lens.py` to compare `mlsae.lm.transformer_lens` against.

TransformerLens is not a dependency of this project: run this by hand in a scratch
environment (transformers 4, which transformer-lens 2 needs), offline,

    python -m venv /tmp/venv-lmsaes
    /tmp/venv-lmsaes/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch-pin.txt
    /tmp/venv-lmsaes/bin/pip install transformer-lens==2.18.0 -c /tmp/torch-pin.txt
    HF_HUB_OFFLINE=1 /tmp/venv-lmsaes/bin/python scripts/crosscheck_transformer_lens.py

It rewrites tests/data/transformer_lens/: one folder per family (GPT-2, GPT-NeoX with its
parallel residual, Qwen 2 with grouped value heads and value biases, Gemma 2), each with
the random Hugging Face model (`save_pretrained`: `config.json`, `model.safetensors`) and
`activations.safetensors`, holding the `tokens` and, for each processing of `OPTIONS`,
`<options>/blocks.<L>.<hook>` as `run_with_cache` returns it (`attn.hook_z` with its heads
concatenated). `owner.json` names the versions and the options.

`HookedTransformer.from_pretrained` takes only official model names, so each model is
built as it builds one, step by step: the config from TransformerLens' own conversion of
the Hugging Face config (`get_pretrained_model_config`; for Gemma 2, which TransformerLens
configures only by official name, its gemma-2-2b dict with tiny sizes), the weights from
its own conversion (`get_pretrained_state_dict`), then `load_and_process_state_dict` with
the processing flags.
"""

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "transformer_lens"
HIDDEN, N_LAYERS, VOCAB, POSITIONS = 16, 2, 32, 16
BATCH, POS = 2, 6

FROM_PRETRAINED = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}
"""`HookedTransformer.from_pretrained`'s defaults."""

OPTIONS: dict[str, dict[str, bool]] = {
    "default": FROM_PRETRAINED,
    "no_centring": {**FROM_PRETRAINED, "center_writing_weights": False},
    "no_processing": {name: False for name in FROM_PRETRAINED},
}
"""The processings recorded: `from_pretrained`'s defaults, those with
`center_writing_weights=False`, and `from_pretrained_no_processing`'s (what SAELens 6 loads
before applying an SAE's `model_from_pretrained_kwargs`)."""

HOOKS = (
    "hook_resid_pre",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln2.hook_normalized",
    "attn.hook_z",
)

_SHAPE = {"vocab_size": VOCAB, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES: dict[str, tuple[type[PreTrainedModel], Any]] = {
    "gpt2": (
        GPT2LMHeadModel,
        # TransformerLens reads `n_ctx`, which GPT2Config no longer sets.
        GPT2Config(
            n_embd=HIDDEN,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=POSITIONS,
            n_ctx=POSITIONS,
            **_SHAPE,
        ),
    ),
    "gpt_neox": (
        GPTNeoXForCausalLM,
        GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=2,
            max_position_embeddings=POSITIONS,
            rotary_pct=0.5,
            use_parallel_residual=True,
            **_SHAPE,
        ),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=POSITIONS,
            **_SHAPE,
        ),
    ),
    "gemma2": (
        Gemma2ForCausalLM,
        # head_dim * heads != hidden: attn_z is wider than the residual stream.
        Gemma2Config(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            max_position_embeddings=POSITIONS,
            sliding_window=POSITIONS,
            attn_implementation="eager",
            **_SHAPE,
        ),
    ),
}


def build(model_class: type[PreTrainedModel], config: Any, seed: int) -> PreTrainedModel:
    """A random model whose norms and biases are far from their initial ones and zeros."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0.0, 0.3)
            elif "norm" in name or "ln" in name:
                centre = 0.0 if isinstance(model, Gemma2ForCausalLM) else 1.0
                parameter.copy_(centre + 0.3 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.3)
    return model.requires_grad_(False)


def gemma2_config(hf: PreTrainedModel) -> dict[str, Any]:
    """TransformerLens' dict for google/gemma-2-2b (`convert_hf_model_config`), sized as `hf`."""
    config = hf.config
    return {
        "d_model": config.hidden_size,
        "d_head": config.head_dim,
        "n_heads": config.num_attention_heads,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "eps": config.rms_norm_eps,
        "d_vocab": config.vocab_size,
        "act_fn": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "normalization_type": "RMS",
        "rotary_base": 10000.0,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": config.num_key_value_heads,
        "window_size": config.sliding_window,
        "use_local_attn": True,
        "attn_types": ["global", "local"] * (config.num_hidden_layers // 2),
        "attn_scores_soft_cap": 50.0,
        "output_logits_soft_cap": 30.0,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "original_architecture": "Gemma2ForCausalLM",
        "tokenizer_name": None,
        "init_weights": False,
    }


def tl_config(path: Path, hf: PreTrainedModel, fold_ln: bool) -> HookedTransformerConfig:
    """The config `from_pretrained` builds (`get_pretrained_model_config`), without a
    tokenizer (these models have none)."""
    if isinstance(hf, Gemma2ForCausalLM):
        cfg_dict = gemma2_config(hf)
        if fold_ln:
            cfg_dict["normalization_type"] = "RMSPre"
        cfg_dict.update(device="cpu", n_devices=1, dtype=torch.float32, from_checkpoint=False)
        cfg_dict["default_prepend_bos"] = True
        return HookedTransformerConfig(**cfg_dict)
    cfg = loading.get_pretrained_model_config(
        str(path), hf_cfg=hf.config.to_dict(), fold_ln=fold_ln, device="cpu"
    )
    cfg.tokenizer_name = None
    return cfg


def lens_model(path: Path, hf: PreTrainedModel, options: dict[str, bool]) -> HookedTransformer:
    """`HookedTransformer.from_pretrained(path, hf_model=hf, **options)`, step by step."""
    cfg = tl_config(path, hf, options["fold_ln"])
    if cfg.output_logits_soft_cap > 0.0:
        # from_pretrained's own override: softcapped logits are not shift-invariant.
        options = {**options, "center_unembed": False}
    state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **options)
    return model.eval()


@torch.no_grad()
def record(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [f"blocks.{layer}.{hook}" for layer in range(N_LAYERS) for hook in HOOKS]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {name: cache[name].flatten(2).clone() for name in names}


@torch.no_grad()
def check_logits(model: HookedTransformer, hf: PreTrainedModel, tokens: torch.Tensor) -> float:
    """The largest difference of log-probabilities, so a wrong conversion shows here."""
    lens = model(tokens).log_softmax(-1)
    return float((lens - hf(input_ids=tokens).logits.log_softmax(-1)).abs().max())


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tokens = torch.randint(0, VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(1))
    report: dict[str, Any] = {}
    for seed, (family, (model_class, config)) in enumerate(FAMILIES.items()):
        hf = build(model_class, config, seed)
        folder = OUT / family
        hf.save_pretrained(folder, safe_serialization=True)
        (folder / "generation_config.json").unlink(missing_ok=True)
        tensors = {"tokens": tokens}
        differences = {}
        with tempfile.TemporaryDirectory() as scratch:
            # TransformerLens reads the config from a folder whose name is not an
            # official one (a name with "gemma-2" or "llama" in it means something).
            path = Path(scratch) / "tiny"
            shutil.copytree(folder, path)
            for name, options in OPTIONS.items():
                model = lens_model(path, hf, options)
                differences[name] = check_logits(model, hf, tokens)
                for hook, tensor in record(model, tokens).items():
                    tensors[f"{name}/{hook}"] = tensor
        save_file(tensors, folder / "activations.safetensors")
        report[family] = {"model": type(hf).__name__, "max_log_prob_difference": differences}
        print(family, differences)
    owner = {
        "transformer_lens": metadata.version("transformer-lens"),
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "options": OPTIONS,
        "hooks": list(HOOKS),
        "families": report,
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=2) + "\n")


if __name__ == "__main__":
    main()
