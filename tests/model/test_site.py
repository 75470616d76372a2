"""An MLSAE at any site of the block (`--site`): its width, what it reads and splices, and
how its site is saved and loaded."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from mlsae.cli import ConfigError
from mlsae.lm.sites import SITES
from mlsae.lm.splice import spliced_metrics
from mlsae.model.hparams import MLSAEHyperparameters
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.upload import tfm_repo_id
from tests.goldens import GOLDENS
from tests.model.tiny_models import SEPARATE_SPECIAL_TOKENS, build_tokenizer

TINY_NEOX = str(GOLDENS / "tiny-gpt-neox-2")
OTHER_SITES = [site for site in SITES if site != "resid_post"]
BOS = 0
"""The tiny GPT-NeoX's BOS and EOS token."""


def make_model(model_name: str = TINY_NEOX, **overrides) -> MLSAETransformer:
    options = dict(expansion_factor=2, k=4, auxk=8, max_length=16, batch_size=2)
    return MLSAETransformer(model_name=model_name, **{**options, **overrides})


def tokens_with_special_positions() -> torch.Tensor:
    tokens = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = BOS
    tokens[1, 9] = BOS
    return tokens


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory) -> str:
    """A tiny Gemma 2 whose heads are together twice as wide as its residual stream."""
    directory = tmp_path_factory.mktemp("gemma2-wide-heads")
    tokenizer = build_tokenizer(SEPARATE_SPECIAL_TOKENS)
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Gemma2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_attn_z_is_as_wide_as_the_heads_together(wide_heads):
    model = make_model(wide_heads, site="attn_z")
    assert model.transformer.d_model == 32
    assert model.n_inputs == 4 * 16
    assert model.n_latents == 2 * 64
    assert model.autoencoder.encoder.weight.shape == (128, 64)
    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    stream = model.residual_stream(tokens)
    assert stream.raw.shape == (2, 2, 16, 64)
    logged = model._evaluate({"input_ids": tokens})
    assert torch.isfinite(logged["val/loss/delta/avg"])
    assert make_model(wide_heads, site="mlp_out").n_inputs == 32


def test_attn_z_of_gpt_neox_is_heads_times_head_dim():
    model = make_model(site="attn_z")
    config = model.transformer.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert model.n_inputs == config.num_attention_heads * head_dim


@pytest.mark.parametrize("site", OTHER_SITES)
def test_the_autoencoder_reads_its_site_with_special_positions_zeroed(site):
    model = make_model(site=site)
    tokens = tokens_with_special_positions()
    stream = model.residual_stream(tokens)
    read = model.transformer.read_sites(tokens, [(layer, site) for layer in model.layers])
    expected = torch.stack([read[layer, site] for layer in model.layers])
    assert torch.equal(stream.raw, expected)
    special = tokens == BOS
    assert torch.equal(stream.mask, ~special)
    assert (stream.inputs[:, special] == 0).all()
    assert torch.equal(stream.inputs[:, ~special], expected[:, ~special])


@pytest.mark.parametrize("count_special_tokens", [False, True])
@pytest.mark.parametrize("site", OTHER_SITES)
def test_an_exact_reconstruction_spliced_at_the_site_costs_nothing(site, count_special_tokens):
    model = make_model(site=site, count_special_tokens=count_special_tokens)
    tokens = tokens_with_special_positions()
    stream = model.residual_stream(tokens)
    spliced = spliced_metrics(model.transformer, tokens, stream, stream.inputs)
    assert torch.equal(spliced["loss_pred"], spliced["loss_true"])
    assert (spliced["kl"] == 0).all()
    assert (spliced["mse"] == 0).all()


def test_resid_post_splices_the_same_with_or_without_tokens():
    model = make_model()
    tokens = tokens_with_special_positions()
    stream = model.residual_stream(tokens).raw + 0.5
    for position in range(model.n_layers):
        without = model.transformer.forward_at_layer(stream, position, "logits")
        with_tokens = model.transformer.forward_at_layer(stream, position, "logits", tokens=tokens)
        assert torch.equal(without, with_tokens)


def test_the_site_is_saved_only_where_it_is_not_the_default(tmp_path: Path):
    make_model().save_pretrained(tmp_path / "resid_post")
    saved = json.loads((tmp_path / "resid_post" / "config.json").read_text())
    assert sorted(saved) == sorted(MLSAEHyperparameters.PUBLISHED)

    model = make_model(site="mlp_out")
    model.save_pretrained(tmp_path / "mlp_out")
    saved = json.loads((tmp_path / "mlp_out" / "config.json").read_text())
    assert saved["site"] == "mlp_out"
    assert (
        "the\nMLP output of each of the blocks" in (tmp_path / "mlp_out" / "README.md").read_text()
    )
    assert tfm_repo_id(model).endswith("-mlp_out-tfm")

    loaded = MLSAETransformer.from_pretrained(tmp_path / "mlp_out")
    assert loaded.site == loaded.transformer.site == "mlp_out"
    tokens = tokens_with_special_positions()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).recons, model(tokens).recons)


def test_a_config_without_a_site_loads_at_resid_post():
    config = json.loads((GOLDENS / "mlsae-tfm-trained" / "config.json").read_text())
    assert "site" not in config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MLSAETransformer.from_pretrained(
            GOLDENS / "mlsae-tfm-trained", model_name=TINY_NEOX
        )
    assert not [warning for warning in caught if "site" in str(warning.message)]
    assert model.site == model.transformer.site == "resid_post"


def test_an_unknown_site_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=f"--site must be one of {', '.join(SITES)}, not 'attn'"):
        make_model(site="attn")


def test_the_tuned_lens_is_refused_at_other_sites():
    with pytest.raises(ConfigError, match="--tuned_lens .* needs --site resid_post, not mlp_out"):
        make_model(site="mlp_out", tuned_lens=True)
