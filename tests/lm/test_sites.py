"""Every site of every supported family: read, spliced back, and what it means.

The meaning checks name each family's modules here, apart from `mlsae.lm.sites`'s table,
so a wrong entry there fails them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mlsae.lm.sites import SITES, find_site, read_sites, splice_site
from mlsae.lm.transformer import Transformer
from tests.model.tiny_models import SEPARATE_SPECIAL_TOKENS, build_tokenizer

HIDDEN = 32
N_LAYERS = 3
VOCAB = 64
BATCH, POS = 2, 8
CHANGED_POSITION = 5

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class Family:
    model_class: type[PreTrainedModel]
    config: dict[str, Any]
    output_projection: str
    """The module that takes attn_z, in a block."""
    mlp_norm: str
    """The norm whose output is the MLP's input, in a block."""
    post_norms: tuple[str, str] | None = None
    """Gemma 2's norms of the attention's and the MLP's outputs."""
    parallel: bool = False
    """Whether the MLP reads the block's input rather than the residual after attention."""
    attn_z_width: int = HIDDEN


_SHAPE = {"vocab_size": VOCAB, "tie_word_embeddings": False}
_LLAMA_SHAPE = {
    **_SHAPE,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
_NEOX_SHAPE = {
    **_SHAPE,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "rotary_pct": 0.5,
}

FAMILIES = {
    "gpt_neox_parallel": Family(
        GPTNeoXForCausalLM,
        {**_NEOX_SHAPE, "use_parallel_residual": True},
        "attention.dense",
        "post_attention_layernorm",
        parallel=True,
    ),
    "gpt_neox_sequential": Family(
        GPTNeoXForCausalLM,
        {**_NEOX_SHAPE, "use_parallel_residual": False},
        "attention.dense",
        "post_attention_layernorm",
    ),
    "gpt2": Family(
        GPT2LMHeadModel,
        {**_SHAPE, "n_embd": HIDDEN, "n_layer": N_LAYERS, "n_head": 4, "n_positions": 64},
        "attn.c_proj",
        "ln_2",
    ),
    "llama3": Family(
        LlamaForCausalLM,
        {**_LLAMA_SHAPE, "max_position_embeddings": 131072, "rope_scaling": LLAMA3_ROPE},
        "self_attn.o_proj",
        "post_attention_layernorm",
    ),
    "gemma2": Family(
        Gemma2ForCausalLM,
        # head_dim * heads != hidden, so attn_z is wider than the residual stream.
        {
            **_LLAMA_SHAPE,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
        "self_attn.o_proj",
        "pre_feedforward_layernorm",
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        attn_z_width=64,
    ),
    "qwen2": Family(Qwen2ForCausalLM, _LLAMA_SHAPE, "self_attn.o_proj", "post_attention_layernorm"),
}
CONFIGS = {
    GPTNeoXForCausalLM: GPTNeoXConfig,
    GPT2LMHeadModel: GPT2Config,
    LlamaForCausalLM: LlamaConfig,
    Gemma2ForCausalLM: Gemma2Config,
    Qwen2ForCausalLM: Qwen2Config,
}
EVERY_SITE = [(layer, site) for layer in range(N_LAYERS) for site in SITES]


def build(family: Family) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = family.model_class(CONFIGS[family.model_class](**family.config))
        # Weights larger than the default std of 0.02 make every site matter to the logits.
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim > 1:
                    parameter.normal_(0.0, 0.2)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[Family, PreTrainedModel, nn.ModuleList]:
    spec = FAMILIES[request.param]
    model = build(spec)
    return spec, model, model.base_model.get_submodule("h" if "gpt2" in request.param else "layers")


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_splicing_what_was_read_reproduces_the_logits(family, tokens) -> None:
    spec, model, blocks = family
    expected = model(input_ids=tokens, use_cache=False).logits
    read = read_sites(model, blocks, tokens, EVERY_SITE)
    for (layer, site), tensor in read.items():
        width = spec.attn_z_width if site == "attn_z" else HIDDEN
        assert tensor.shape == (BATCH, POS, width), (layer, site)
        # The same kernels run on the same inputs, so the logits are the same bits.
        assert torch.equal(splice_site(model, blocks, tokens, layer, site, tensor), expected)


@torch.no_grad()
def test_splicing_a_changed_tensor_changes_the_logits_from_its_position(family, tokens) -> None:
    _, model, blocks = family
    expected = model(input_ids=tokens, use_cache=False).logits
    read = read_sites(model, blocks, tokens, EVERY_SITE)
    generator = torch.Generator().manual_seed(2)
    for (layer, site), tensor in read.items():
        changed = tensor.clone()
        changed[:, CHANGED_POSITION] += torch.randn(changed[:, 0].shape, generator=generator)
        logits = splice_site(model, blocks, tokens, layer, site, changed)
        # Causal attention gives the masked later positions a weight of exactly 0.
        before = slice(None, CHANGED_POSITION)
        assert torch.equal(logits[:, before], expected[:, before]), (layer, site)
        assert (logits[:, CHANGED_POSITION] != expected[:, CHANGED_POSITION]).any(), (layer, site)


@torch.no_grad()
def test_the_residual_stream_is_the_sum_of_what_each_sublayer_adds(family, tokens) -> None:
    _, model, blocks = family
    read = read_sites(model, blocks, tokens, EVERY_SITE)
    for layer in range(N_LAYERS):
        pre, post = read[layer, "resid_pre"], read[layer, "resid_post"]
        attn_out, mlp_out = read[layer, "attn_out"], read[layer, "mlp_out"]
        # Parallel GPT-NeoX adds the three in another order: rounding differs.
        torch.testing.assert_close(post, pre + attn_out + mlp_out, rtol=0, atol=1e-5)
        if layer + 1 < N_LAYERS:
            assert torch.equal(read[layer + 1, "resid_pre"], post)


@torch.no_grad()
def test_each_sublayer_site_is_what_its_modules_compute(family, tokens) -> None:
    spec, model, blocks = family
    read = read_sites(model, blocks, tokens, EVERY_SITE)
    for layer, block in enumerate(blocks):
        attn_z, attn_out = read[layer, "attn_z"], read[layer, "attn_out"]
        mlp_in, mlp_out = read[layer, "mlp_in"], read[layer, "mlp_out"]
        projected = block.get_submodule(spec.output_projection)(attn_z)
        expected_mlp_out = block.mlp(mlp_in)
        if spec.post_norms is not None:
            attention_norm, mlp_norm = (block.get_submodule(name) for name in spec.post_norms)
            projected, expected_mlp_out = attention_norm(projected), mlp_norm(expected_mlp_out)
        assert torch.equal(attn_out, projected), layer
        assert torch.equal(mlp_out, expected_mlp_out), layer

        mlp_reads = read[layer, "resid_pre"]
        if not spec.parallel:
            mlp_reads = mlp_reads + attn_out
        assert torch.equal(mlp_in, block.get_submodule(spec.mlp_norm)(mlp_reads)), layer


@torch.no_grad()
def test_reading_stops_after_the_last_site_needed(family, tokens) -> None:
    _, model, blocks = family
    calls = []
    handle = blocks[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        read_sites(model, blocks, tokens, [(1, "mlp_in"), (0, "resid_post")])
    finally:
        handle.remove()
    assert calls == []


@torch.no_grad()
def test_the_transformer_reads_and_splices_every_site(family, tokens) -> None:
    _, model, _ = family
    transformer = Transformer(
        "tiny", model=model, tokenizer=build_tokenizer(SEPARATE_SPECIAL_TOKENS)
    )
    read = transformer.read_sites(tokens, [(0, "resid_post"), (2, "resid_post"), (1, "attn_z")])
    hidden_states = transformer.hidden_states(tokens)
    assert torch.equal(read[0, "resid_post"], hidden_states[0])
    assert torch.equal(read[2, "resid_post"], hidden_states[2])
    logits = transformer.logits_with_site_replaced(tokens, 1, "attn_z", read[1, "attn_z"])
    assert torch.equal(logits, model(input_ids=tokens, use_cache=False).logits)


def test_unknown_sites_and_bad_replacements_are_refused() -> None:
    model = build(FAMILIES["qwen2"])
    blocks, tokens = model.model.layers, torch.zeros(1, 4, dtype=torch.long)
    listing = ", ".join(SITES)
    with pytest.raises(ValueError, match=f"unknown site 'attn_in'; expected one of {listing}"):
        read_sites(model, blocks, tokens, [(0, "attn_in")])
    with pytest.raises(ValueError, match=f"expected one of {listing}"):
        splice_site(model, blocks, tokens, 0, "resid", torch.zeros(1, 4, HIDDEN))
    with pytest.raises(ValueError, match=r"block index in \[0, 3\), not 3"):
        read_sites(model, blocks, tokens, [(3, "resid_pre")])
    with pytest.raises(ValueError, match=r"has shape \(1, 3, 32\), but the model computes"):
        splice_site(model, blocks, tokens, 1, "mlp_out", torch.zeros(1, 3, HIDDEN))


def test_a_family_without_a_site_table_has_only_the_residual_stream() -> None:
    class ToyModel(nn.Module):
        pass

    block = nn.Linear(2, 2)
    assert find_site(ToyModel(), block, "resid_post") == (block, False)
    assert find_site(ToyModel(), block, "resid_pre") == (block, True)
    with pytest.raises(ValueError, match="ToyModel has no known attn_z site.*not Linear"):
        find_site(ToyModel(), block, "attn_z")
