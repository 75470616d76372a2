"""Stacks of tiny SAELens SAEs written to disk, over the golden GPT-NeoX and a tiny Llama
built here, for the tests of `mlsae.saes.stack`, `StackSource` and the explorer."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mlsae.lm.architecture import find_decoder_blocks
from tests.goldens import GOLDENS

GPT_NEOX = GOLDENS / "tiny-gpt-neox-2"
"""4 blocks of width 48."""


def write_saelens(
    folder: Path,
    layer: int | None,
    d_in: int,
    d_sae: int,
    architecture: str = "standard",
    seed: int = 0,
    site: str = "resid_post",
) -> dict[str, torch.Tensor]:
    """An SAELens 6 SAE reading `site` of block `layer` (None: a hook name without a
    block), with biases that let some latents fire and others not; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen) - 1.0,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) * 0.2,
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=gen)
    hook = f"blocks.{layer}.hook_{site}" if layer is not None else f"hook_{site}"
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": hook},
        "architecture": architecture,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return tensors


def write_stack(root: Path, layers: list[int], d_in: int, d_saes: list[int]) -> list[dict]:
    """`root/layer_<L>` for each layer: standard and JumpReLU SAEs in turn, of the given
    widths; returns each one's tensors."""
    return [
        write_saelens(
            root / f"layer_{layer}",
            layer,
            d_in,
            d_sae,
            "jumprelu" if index % 2 else "standard",
            seed=index,
        )
        for index, (layer, d_sae) in enumerate(zip(layers, d_saes, strict=True))
    ]


def write_tiny_llama(folder: Path) -> Path:
    """A random 3-block Llama of width 32 with the golden GPT-NeoX's tokenizer."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(GPT_NEOX)).save_pretrained(folder)
    return folder


def block_outputs(
    model_folder: Path, tokens: torch.Tensor, replace: dict[int, torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output, read with hooks of this module's own, and the logits; with
    `replace`, the given blocks output those tensors instead."""
    model = AutoModelForCausalLM.from_pretrained(str(model_folder)).eval()
    blocks = model.get_submodule(find_decoder_blocks(model, model.config.num_hidden_layers))
    outputs: list[torch.Tensor] = []

    def hook(index: int):
        def read(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs.append(hidden)
            new = (replace or {}).get(index)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return read

    hooks = [block.register_forward_hook(hook(index)) for index, block in enumerate(blocks)]
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    for handle in hooks:
        handle.remove()
    return outputs, logits


def encode_by_hand(tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens' standard or JumpReLU encode of `x`, written out."""
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if "threshold" in tensors:
        return pre.relu() * (pre > tensors["threshold"])
    return pre.relu()
