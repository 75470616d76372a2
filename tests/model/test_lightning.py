import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.model.hub import CheckpointError
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS, load_golden

TINY_NEOX = str(GOLDENS / "tiny-gpt-neox-2")


@pytest.fixture(scope="module")
def golden():
    return load_golden("golden-tfm.safetensors")


def load_golden_model(**overrides) -> MLSAETransformer:
    return MLSAETransformer.from_pretrained(
        GOLDENS / "mlsae-tfm-trained", model_name=TINY_NEOX, **overrides
    )


@pytest.fixture(scope="module")
def original_numbers():
    return load_golden_model(count_special_tokens=True)


def test_golden_residual_stream_and_forward(golden, original_numbers):
    model = original_numbers
    stream = model.residual_stream(golden["tokens"])
    torch.testing.assert_close(stream.raw, golden["hidden_states"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.inputs, golden["inputs"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = model(golden["tokens"])
    indices, order = out.topk.indices.sort(dim=-1)
    assert torch.equal(indices, golden["fwd.topk_indices"])
    torch.testing.assert_close(
        out.topk.values.gather(-1, order), golden["fwd.topk_values"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out.recons, golden["fwd.recons"], rtol=1e-5, atol=1e-5)


def test_golden_spliced_losses(golden, original_numbers):
    model = original_numbers
    stream = model.residual_stream(golden["tokens"])
    with torch.no_grad():
        recons = model(golden["tokens"]).recons
    spliced = model.spliced_metrics(golden["tokens"], stream, recons)
    torch.testing.assert_close(spliced["loss_true"], golden["loss_true"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spliced["loss_pred"], golden["loss_pred"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spliced["mse"], golden["metric.logit_mse"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(spliced["kl"], golden["metric.logit_kldiv"], rtol=1e-4, atol=1e-6)


def test_golden_logged_metrics(golden, original_numbers):
    logged = original_numbers._evaluate({"input_ids": golden["tokens"]})
    compared = [key[len("logged.") :] for key in golden if key.startswith("logged.")]
    assert len(compared) == 31
    for name in compared:
        torch.testing.assert_close(
            logged[name], golden[f"logged.{name}"], rtol=1e-4, atol=1e-6, msg=name
        )
    torch.testing.assert_close(logged["train/l0/layer_0"], golden["metric.l0"][0])


def test_special_tokens_are_excluded_by_default(golden):
    model = load_golden_model()
    tokens = golden["tokens"]
    stream = model.residual_stream(tokens)
    kept = golden["special_mask"].bool()
    assert torch.equal(stream.mask, kept)
    logged = model._evaluate({"input_ids": tokens})
    with torch.no_grad():
        recons = model(tokens).recons
    inputs = golden["inputs"]
    kept_inputs, kept_recons = inputs[:, kept], recons[:, kept]
    fvu = (kept_recons - kept_inputs).pow(2).mean(dim=(1, 2)) / kept_inputs.var(dim=(1, 2))
    torch.testing.assert_close(logged["train/fvu/layer_2"], fvu[2], rtol=1e-5, atol=1e-6)
    # Splicing leaves the special positions' own residual stream in place.
    spliced = model.spliced_metrics(tokens, stream, recons)
    logits = model.transformer.model(input_ids=tokens).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1][kept[:, :-1]], tokens[:, 1:][kept[:, :-1]]
    )
    torch.testing.assert_close(spliced["loss_true"], ce.expand(4), rtol=1e-5, atol=1e-6)


def test_loading_is_strict_and_tolerates_the_original_buffers(tmp_path):
    source = GOLDENS / "mlsae-tfm-trained"
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["model_name"] = TINY_NEOX

    with_buffers = tmp_path / "with_buffers"
    with_buffers.mkdir()
    (with_buffers / "config.json").write_text(json.dumps(config))
    extra = {
        "loss_true": torch.zeros(4),
        "logits_true": torch.zeros(4, 1, 2, 512),
        "autoencoder.last_nonzero": torch.zeros(384, dtype=torch.long),
    }
    save_file({**tensors, **extra}, with_buffers / "model.safetensors")
    model = MLSAETransformer.from_pretrained(with_buffers)
    assert torch.equal(model.autoencoder.encoder.weight, tensors["autoencoder.encoder.weight"])
    assert not hasattr(model, "logits_true")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    missing = {k: v for k, v in tensors.items() if k != "transformer.model.embed_out.weight"}
    save_file({**missing, "autoencoder.surprise": torch.zeros(1)}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="embed_out.weight") as error:
        MLSAETransformer.from_pretrained(broken)
    assert "autoencoder.surprise" in str(error.value)


def test_checkpoint_weights_come_from_the_checkpoint(tmp_path):
    model = load_golden_model()
    tensors = load_file(GOLDENS / "mlsae-tfm-trained" / "model.safetensors")
    state = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key


def test_save_pretrained_round_trip(tmp_path, golden):
    model = load_golden_model()
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert not any(key.startswith(("loss_", "logits_")) for key in saved)
    assert "transformer.model.embed_out.weight" in saved
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    # The language model's folder, stored relative to the saved model's.
    assert os.path.normpath(tmp_path / "saved" / config["model_name"]) == str(TINY_NEOX)
    assert config["expansion_factor"] == 8
    loaded = MLSAETransformer.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        a, b = model(golden["tokens"]), loaded(golden["tokens"])
    assert torch.equal(a.topk.indices, b.topk.indices)
    assert torch.equal(a.recons, b.recons)


def test_published_names_stay_available():
    model = load_golden_model()
    assert model.n_layers == 4 and model.n_latents == 384 and model.layers == [0, 1, 2, 3]
    assert model.model_name == TINY_NEOX and model.expansion_factor == 8 and model.k == 6
    assert model.hparams_initial["k"] == 6
    assert isinstance(model.autoencoder.encoder, torch.nn.Linear)
    assert model.transformer.tokenizer is not None and model.transformer.model is not None


def test_copy_of_goldens_with_relative_model_name(tmp_path, monkeypatch):
    shutil.copytree(GOLDENS / "tiny-gpt-neox-2", tmp_path / "tiny-gpt-neox-2")
    shutil.copytree(GOLDENS / "mlsae-tfm-trained", tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    model = MLSAETransformer.from_pretrained("ckpt")
    assert model.n_inputs == 48


PUBLISHED_CONFIG = {
    "accumulate_grad_batches": 64,
    "auxk": 16,
    "auxk_coef": 0.03125,
    "batch_size": 1,
    "dead_steps_threshold": None,
    "dead_threshold": 0.001,
    "dead_tokens_threshold": 10000000,
    "expansion_factor": 4,
    "k": 4,
    "layers": None,
    "lr": 0.0001,
    "max_length": 64,
    "skip_special_tokens": True,
    "standardize": True,
    "tuned_lens": False,
}


def write_published_tfm(folder, model_dir, layers=None, seed=0):
    """A `-tfm` checkpoint laid out like the published ones, from a tiny GPT-NeoX."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, value in hf_model.state_dict().items():
        name = name.replace("lm_head.", "embed_out.")
        tensors[f"transformer.model.{name}"] = value.contiguous()
    d, n = 32, 128
    decoder = torch.randn(d, n, generator=generator)
    tensors["autoencoder.encoder.weight"] = torch.randn(n, d, generator=generator)
    tensors["autoencoder.decoder.weight"] = decoder / decoder.norm(dim=0) * 1.0003
    tensors["autoencoder.pre_encoder_bias"] = 0.1 * torch.randn(d, generator=generator)
    folder.mkdir()
    config = {**PUBLISHED_CONFIG, "model_name": str(model_dir), "layers": layers}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return tensors, hf_model


@pytest.mark.parametrize("layers", [None, [2]])
def test_published_layout_built_in_test(tmp_path, layers):
    from tests.model.tiny_models import save_tiny_model

    model_dir = save_tiny_model("gpt_neox", tmp_path / "tiny")
    tensors, hf_model = write_published_tfm(tmp_path / "tfm", model_dir, layers)
    model = MLSAETransformer.from_pretrained(tmp_path / "tfm")
    assert model.layers == (layers or [0, 1, 2, 3])
    tokens = torch.randint(1, 300, (2, 16))
    # HF applies the final norm to its last hidden state; the block's own output has none.
    hf_model.gpt_neox.final_layer_norm = torch.nn.Identity()
    hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    x = torch.stack([hidden[layer + 1] for layer in model.layers]).detach()
    encoder = tensors["autoencoder.encoder.weight"]
    decoder = tensors["autoencoder.decoder.weight"]
    bias = tensors["autoencoder.pre_encoder_bias"]
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    pre = ((x - mean) / (std + 1e-5) - bias) @ encoder.T
    top = pre.topk(4, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    expected = (latents @ decoder.T + bias) * std + mean
    with torch.no_grad():
        out = model(tokens)
    torch.testing.assert_close(out.recons, expected, rtol=1e-4, atol=1e-4)
