"""TransformerLens' activations from Hugging Face's: tiny random models whose
TransformerLens activations scripts/crosscheck_transformer_lens.py recorded with
transformer-lens itself (tests/data/transformer_lens/), read here with `Transformer` and
mapped with `mlsae.lm.transformer_lens`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlsae.lm.sites import SITES
from mlsae.lm.transformer import Transformer
from mlsae.lm.transformer_lens import (
    FROM_PRETRAINED,
    NO_PROCESSING,
    TransformerLensOptions,
    lens_map,
)
from tests.model.tiny_models import SEPARATE_SPECIAL_TOKENS, build_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "transformer_lens"
OWNER = json.loads((DATA / "owner.json").read_text())
HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_in": "ln2.hook_normalized",
    "attn_z": "attn.hook_z",
}
N_LAYERS = 2


@pytest.fixture(scope="module", params=sorted(OWNER["families"]))
def recorded(request: pytest.FixtureRequest) -> tuple[str, Transformer, dict, dict]:
    folder = DATA / request.param
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    tokenizer = build_tokenizer(SEPARATE_SPECIAL_TOKENS)
    transformer = Transformer(str(folder), model=model, tokenizer=tokenizer)
    lens = load_file(folder / "activations.safetensors")
    wanted = [(layer, site) for layer in range(N_LAYERS) for site in SITES]
    return request.param, transformer, transformer.read_sites(lens["tokens"], wanted), lens


@pytest.mark.parametrize("processing", sorted(OWNER["options"]))
def test_mapped_activations_are_transformer_lens_ones(recorded, processing) -> None:
    family, transformer, hf, lens = recorded
    options = TransformerLensOptions(**OWNER["options"][processing])
    for (layer, site), x in hf.items():
        expected = lens[f"{processing}/blocks.{layer}.{HOOKS[site]}"]
        mapped = lens_map(transformer, layer, site, options).to_lens(x)
        torch.testing.assert_close(mapped, expected, atol=1e-5, rtol=1e-5, msg=(layer, site))


@pytest.mark.parametrize("processing", sorted(OWNER["options"]))
def test_mapping_back_gives_the_hugging_face_activations(recorded, processing) -> None:
    _, transformer, hf, _ = recorded
    options = TransformerLensOptions(**OWNER["options"][processing])
    for (layer, site), x in hf.items():
        mapping = lens_map(transformer, layer, site, options)
        torch.testing.assert_close(mapping.to_model(mapping.to_lens(x), x), x, atol=1e-5, rtol=0)


def test_the_recorded_activations_differ_where_the_processing_says(recorded) -> None:
    """Identity maps must be right for a reason: where a map is not the identity, the
    recorded activations are not Hugging Face's."""
    family, transformer, hf, lens = recorded
    for processing, flags in OWNER["options"].items():
        for (layer, site), x in hf.items():
            expected = lens[f"{processing}/blocks.{layer}.{HOOKS[site]}"]
            identity = lens_map(transformer, layer, site, TransformerLensOptions(**flags))
            assert identity.is_identity == torch.allclose(x, expected, atol=1e-5), (
                family,
                processing,
                layer,
                site,
            )


def test_what_differs_per_family(recorded) -> None:
    family, transformer, _, _ = recorded
    layer_norm = family in ("gpt2", "gpt_neox")
    changed = {
        site for site in SITES if not lens_map(transformer, 1, site, FROM_PRETRAINED).is_identity
    }
    writes = {"resid_pre", "resid_post", "attn_out", "mlp_out"}
    value_bias = family != "gemma2"  # Gemma 2 has no value bias
    assert changed == (writes if layer_norm else set()) | {"mlp_in"} | (
        {"attn_z"} if value_bias else set()
    )
    unprocessed = {
        site for site in SITES if not lens_map(transformer, 1, site, NO_PROCESSING).is_identity
    }
    # An RMSNorm's ln2.hook_normalized is before its gain even without fold_ln.
    assert unprocessed == (set() if layer_norm else {"mlp_in"})


def test_options_from_keyword_arguments() -> None:
    assert TransformerLensOptions.of({}) == FROM_PRETRAINED == TransformerLensOptions()
    assert TransformerLensOptions.of(None, processed=False) == NO_PROCESSING
    kwargs = {"center_writing_weights": True, "dtype": "bfloat16", "n_devices": 1}
    assert TransformerLensOptions.of(kwargs, processed=False) == NO_PROCESSING._replace(
        center_writing_weights=True
    )
    assert TransformerLensOptions.of({"fold_ln": False}).fold_ln is False


def test_a_mapping_of_options_and_none(recorded) -> None:
    family, transformer, hf, _ = recorded
    x = hf[0, "resid_pre"]
    from_kwargs = lens_map(transformer.model, 0, "resid_pre", {"center_writing_weights": False})
    assert from_kwargs.is_identity
    assert lens_map(transformer, 0, "attn_z", None).is_identity
    default = lens_map(transformer, 0, "resid_pre")
    assert default == lens_map(transformer, 0, "resid_pre", FROM_PRETRAINED)
    if family in ("gpt2", "gpt_neox"):
        torch.testing.assert_close(default.to_lens(x), x - x.mean(-1, keepdim=True))
        with pytest.raises(ValueError, match="needs the original Hugging Face activations"):
            default.to_model(default.to_lens(x))


def test_refused_options_and_places(recorded) -> None:
    _, transformer, _, _ = recorded
    refactor = FROM_PRETRAINED._replace(refactor_factored_attn_matrices=True)
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices"):
        lens_map(transformer, 0, "attn_z", refactor)
    assert lens_map(transformer, 0, "resid_pre", refactor) == lens_map(transformer, 0, "resid_pre")
    with pytest.raises(ValueError, match="block index"):
        lens_map(transformer, N_LAYERS, "resid_pre")
    with pytest.raises(ValueError, match="unknown site"):
        lens_map(transformer, 0, "hook_z")
