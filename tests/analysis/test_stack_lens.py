"""A stack of SAELens SAEs trained on TransformerLens' activations reads those activations
from the Hugging Face model, and splices its reconstructions back in the model's terms:
checked against what transformer-lens recorded on a tiny GPT-2 and Qwen 2
(tests/data/transformer_lens/, scripts/crosscheck_transformer_lens.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlsae.analysis.source import StackSource
from mlsae.lm.transformer import Transformer
from mlsae.lm.transformer_lens import FROM_PRETRAINED, NO_PROCESSING
from mlsae.saes import load_sae, load_sae_stack
from tests.model.tiny_models import SEPARATE_SPECIAL_TOKENS, build_tokenizer
from tests.saes.stack_files import write_saelens

DATA = Path(__file__).resolve().parents[1] / "data" / "transformer_lens"
OWNER = json.loads((DATA / "owner.json").read_text())
SITES = {  # what each SAE of the stack reads: (block, site, TransformerLens hook)
    0: ("mlp_in", "ln2.hook_normalized"),
    1: ("resid_post", "hook_resid_post"),
}


def write_lens_sae(folder: Path, layer: int, metadata: dict) -> Path:
    write_saelens(folder, layer, 16, 8, site="resid_post")
    hook = f"blocks.{layer}.{SITES[layer][1]}"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"] = {**cfg["metadata"], **metadata, "hook_name": hook}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def lens_stack(family: str, tmp_path: Path, processing: str) -> tuple[StackSource, dict]:
    folder = DATA / family
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    transformer = Transformer(
        str(folder), model=model, tokenizer=build_tokenizer(SEPARATE_SPECIAL_TOKENS)
    )
    kwargs = OWNER["options"][processing]
    paths = [
        write_lens_sae(tmp_path / f"layer_{layer}", layer, {"model_from_pretrained_kwargs": kwargs})
        for layer in SITES
    ]
    stack = load_sae_stack([str(path) for path in paths])
    return StackSource(transformer, stack), load_file(folder / "activations.safetensors")


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("processing", ["default", "no_processing"])
def test_a_stack_reads_what_transformer_lens_computed(family, processing, tmp_path) -> None:
    source, recorded = lens_stack(family, tmp_path, processing)
    read = source.read(recorded["tokens"])
    for position, (layer, (_, hook)) in enumerate(SITES.items()):
        expected = recorded[f"{processing}/blocks.{layer}.{hook}"]
        torch.testing.assert_close(read[position], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_splicing_what_the_sae_read_gives_the_models_own_logits(family, tmp_path) -> None:
    source, recorded = lens_stack(family, tmp_path, "default")
    tokens = recorded["tokens"]
    own = source.transformer.model(input_ids=tokens).logits
    read = source.read(tokens)
    assert not all(lens.is_identity for lens in source.reader.input_maps)
    for position in range(source.n_layers):
        # Not a constant, which the norms after a LayerNorm model's residual stream remove.
        changed = read[position] + torch.linspace(-1, 1, read[position].shape[-1])
        spliced = source.logits_with_replaced(tokens, position, read[position])
        torch.testing.assert_close(spliced, own, atol=1e-5, rtol=1e-5)
        # Positions left out keep the model's own activations, exactly.
        nowhere = torch.zeros(tokens.shape, dtype=torch.bool)
        kept = source.logits_with_replaced(tokens, position, changed, nowhere)
        assert torch.equal(kept, own)
        # Elsewhere the replacement takes effect.
        moved = source.logits_with_replaced(tokens, position, changed)
        assert not torch.allclose(moved, own, atol=1e-3)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, NO_PROCESSING),
        (
            {"model_from_pretrained_kwargs": {"center_writing_weights": True}},
            NO_PROCESSING._replace(center_writing_weights=True),
        ),
        ({"model_from_pretrained_kwargs": dict(FROM_PRETRAINED._asdict())}, FROM_PRETRAINED),
        ({"model_class_name": "AutoModelForCausalLM"}, None),
    ],
)
def test_the_activation_source_follows_saelens_own_model_loading(
    metadata, expected, tmp_path
) -> None:
    """SAELens loads a `HookedTransformer` with `from_pretrained_no_processing(**
    model_from_pretrained_kwargs)` to train and evaluate."""
    folder = write_lens_sae(tmp_path / "sae", 1, metadata)
    assert load_sae(str(folder)).activation_source == expected


def test_hugging_face_and_bridge_hooks_read_the_models_own_activations(tmp_path) -> None:
    folder = write_lens_sae(tmp_path / "sae", 1, {})
    for hook in ("model.layers.1", "blocks.1.hook_out"):
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = hook
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert load_sae(str(folder)).activation_source is None, hook


def test_flat_configs_give_their_keyword_arguments(tmp_path) -> None:
    folder = write_lens_sae(tmp_path / "sae", 1, {})
    cfg = json.loads((folder / "cfg.json").read_text())
    flat = {key: value for key, value in cfg.items() if key not in ("metadata", "architecture")}
    flat.update(
        hook_name="blocks.1.hook_resid_post",
        hook_layer=1,
        model_class_name="HookedTransformer",
        model_from_pretrained_kwargs={"center_writing_weights": True},
    )
    (folder / "cfg.json").write_text(json.dumps(flat))
    sae = load_sae(str(folder))
    assert sae.activation_source == NO_PROCESSING._replace(center_writing_weights=True)
