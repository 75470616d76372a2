import json

import pytest
import torch
from safetensors.torch import save_file

from mlsae.model.autoencoder import (
    MLSAE,
    standardize,
    unit_norm_decoder,
    unit_norm_decoder_gradient,
    unstandardize,
)
from mlsae.model.geom_median import geometric_median
from mlsae.model.hub import CheckpointError
from mlsae.model.losses import mlsae_loss
from mlsae.model.reference import ReferenceSAE
from mlsae.model.types import TopK
from tests.goldens import GOLDENS, load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("golden-ae.safetensors")


@pytest.fixture
def trained():
    return MLSAE.from_pretrained(GOLDENS / "mlsae-ae-trained")


def dense(topk: TopK, n_latents: int) -> torch.Tensor:
    out = torch.zeros(*topk.values.shape[:-1], n_latents, dtype=topk.values.dtype)
    return out.scatter(-1, topk.indices, topk.values)


def reference_forward(x, encoder, decoder, bias, k):
    """The forward pass by the dense reference: dense latents and reconstructions."""
    reference = ReferenceSAE(encoder, decoder, bias, k, auxk=None)
    out = reference(x)
    latents = torch.zeros(*x.shape[:-1], encoder.shape[0]).scatter(-1, out.indices, out.values)
    return latents, out.recons


def test_golden_checkpoint_forward(golden, trained):
    with torch.no_grad():
        out = trained.forward(golden["x"])
    torch.testing.assert_close(dense(out.topk, 384), golden["fwd.topk_dense"], rtol=1e-5, atol=1e-6)
    indices, order = out.topk.indices.sort(dim=-1)
    torch.testing.assert_close(indices, golden["fwd.topk_indices"])
    torch.testing.assert_close(out.topk.values.gather(-1, order), golden["fwd.topk_values"])
    torch.testing.assert_close(out.recons, golden["fwd.recons"], rtol=1e-5, atol=1e-5)


def test_golden_checkpoint_is_not_renormalised(trained):
    norms = trained.decoder.weight.norm(dim=0)
    assert (norms - 1).abs().max() > 1e-4
    weights = load_golden("mlsae-ae-trained/model.safetensors")
    assert torch.equal(trained.decoder.weight, weights["decoder.weight"])
    assert torch.equal(trained.pre_encoder_bias, weights["pre_encoder_bias"])


def test_golden_standardisation_stats(golden):
    _, stats = standardize(golden["x"])
    torch.testing.assert_close(stats.mean, golden["stats.mean"])
    torch.testing.assert_close(stats.std, golden["stats.std"])


def test_golden_geometric_median(golden):
    torch.testing.assert_close(
        geometric_median(golden["x"]), golden["geometric_median"], rtol=1e-5, atol=1e-6
    )


def test_golden_decoder_maintenance(golden):
    weights = load_golden("mlsae-ae-trained/model.safetensors")
    decoder = torch.nn.Linear(384, 48, bias=False)
    decoder.weight.data = weights["decoder.weight"].clone()
    decoder.weight.grad = golden["step.grad_raw.decoder.weight"].clone()
    unit_norm_decoder(decoder)
    torch.testing.assert_close(decoder.weight.data, golden["step.normed.decoder.weight"])
    unit_norm_decoder_gradient(decoder)
    torch.testing.assert_close(
        decoder.weight.grad, golden["step.grad.decoder.weight"], rtol=1e-5, atol=1e-7
    )


def test_initialisation_matches_original_seed_for_seed(golden):
    torch.manual_seed(12)
    model = MLSAE(48, 384, 6, 20, 1e-3, 24, True)
    assert torch.equal(model.encoder.weight, golden["train.encoder_weight_init"])
    expected = model.encoder.weight.T / model.encoder.weight.T.norm(dim=0)
    torch.testing.assert_close(model.decoder.weight, expected)
    assert torch.equal(model.pre_encoder_bias, torch.zeros(48))


def write_original_layout(path, config, tensors):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors")


def original_tensors(n_inputs=16, n_latents=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(n_inputs, n_latents, generator=generator)
    decoder = (
        decoder / decoder.norm(dim=0) * (1 + 0.01 * torch.rand(n_latents, generator=generator))
    )
    return {
        "encoder.weight": torch.randn(n_latents, n_inputs, generator=generator),
        "decoder.weight": decoder,
        "pre_encoder_bias": 0.1 * torch.randn(n_inputs, generator=generator),
        "last_nonzero": torch.randint(0, 50, (n_latents,), generator=generator),
    }


ORIGINAL_CONFIG = {
    "n_inputs": 16,
    "n_latents": 64,
    "k": 4,
    "dead_steps_threshold": 20,
    "dead_threshold": 0.001,
    "auxk": 8,
    "standardize": True,
}


@pytest.mark.parametrize("with_last_nonzero", [True, False])
def test_original_layout_loads_and_reproduces_forward(tmp_path, with_last_nonzero):
    tensors = original_tensors()
    if not with_last_nonzero:
        del tensors["last_nonzero"]
    write_original_layout(tmp_path / "ckpt", ORIGINAL_CONFIG, tensors)
    model = MLSAE.from_pretrained(tmp_path / "ckpt")
    x = torch.randn(3, 2, 5, 16) * 3 + 1
    with torch.no_grad():
        out = model(x)
    latents, recons = reference_forward(
        x, tensors["encoder.weight"], tensors["decoder.weight"], tensors["pre_encoder_bias"], 4
    )
    torch.testing.assert_close(dense(out.topk, 64), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recons, recons, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.decoder.weight, tensors["decoder.weight"])


def test_loading_names_missing_and_unexpected_tensors(tmp_path):
    tensors = original_tensors()
    del tensors["pre_encoder_bias"]
    tensors["extra.weight"] = torch.zeros(2)
    write_original_layout(tmp_path / "ckpt", ORIGINAL_CONFIG, tensors)
    with pytest.raises(CheckpointError, match="pre_encoder_bias") as error:
        MLSAE.from_pretrained(tmp_path / "ckpt")
    assert "extra.weight" in str(error.value)


def test_loading_rejects_shapes_that_disagree_with_config(tmp_path):
    write_original_layout(
        tmp_path / "ckpt", {**ORIGINAL_CONFIG, "n_latents": 32}, original_tensors()
    )
    with pytest.raises(CheckpointError, match="encoder.weight"):
        MLSAE.from_pretrained(tmp_path / "ckpt")


def test_unknown_config_key_warns_and_missing_required_key_raises(tmp_path):
    write_original_layout(tmp_path / "a", {**ORIGINAL_CONFIG, "colour": "red"}, original_tensors())
    with pytest.warns(UserWarning, match="colour"):
        MLSAE.from_pretrained(tmp_path / "a")
    config = dict(ORIGINAL_CONFIG)
    del config["k"]
    write_original_layout(tmp_path / "b", config, original_tensors())
    with pytest.raises(CheckpointError, match="k"):
        MLSAE.from_pretrained(tmp_path / "b")


def test_save_pretrained_round_trip(tmp_path):
    model = MLSAE(16, 64, 4, auxk=8, dead_tokens_threshold=100)
    model.update_dead_latents(torch.zeros(64, dtype=torch.long), 150)
    model.save_pretrained(tmp_path / "saved")
    loaded = MLSAE.from_pretrained(tmp_path / "saved")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.dead_tokens_threshold == 100
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).recons, loaded(x).recons)


def _latent_major(model: MLSAE) -> bool:
    weight = model.decoder.weight
    return weight.shape == (model.n_inputs, model.n_latents) and weight.t().is_contiguous()


def test_decoder_is_stored_latent_major_through_conversion_saving_and_loading(tmp_path):
    model = MLSAE(16, 64, 4, auxk=8)
    assert _latent_major(model)
    assert _latent_major(model.double()) and model.decoder.weight.dtype == torch.float64
    model.float().save_pretrained(tmp_path / "saved")
    loaded = MLSAE.from_pretrained(tmp_path / "saved")
    assert _latent_major(loaded)
    assert torch.equal(loaded.decoder.weight, model.decoder.weight)
    other = MLSAE(16, 64, 4, auxk=8)
    other.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    assert _latent_major(other) and torch.equal(other.decoder.weight, model.decoder.weight)


def test_standardisation_round_trip():
    x = torch.randn(4, 7, 32) * 5 + 2
    x_std, stats = standardize(x)
    torch.testing.assert_close(x_std.mean(-1), torch.zeros(4, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_std.std(-1), torch.ones(4, 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(unstandardize(x_std, stats), x, atol=1e-4, rtol=1e-5)


def test_decoder_maintenance_makes_unit_columns_and_orthogonal_gradient():
    decoder = torch.nn.Linear(64, 16, bias=False)
    decoder.weight.grad = torch.randn(16, 64)
    unit_norm_decoder(decoder)
    torch.testing.assert_close(decoder.weight.norm(dim=0), torch.ones(64))
    unit_norm_decoder_gradient(decoder)
    parallel = (decoder.weight.grad * decoder.weight).sum(dim=0)
    torch.testing.assert_close(parallel, torch.zeros(64), atol=1e-6, rtol=0)


def test_decoder_gradient_projection_needs_a_gradient():
    with pytest.raises(ValueError, match="gradient"):
        unit_norm_decoder_gradient(torch.nn.Linear(8, 4, bias=False))


@pytest.mark.parametrize("backend", [None, "native", "fused", "sparse", "dense"])
def test_loss_and_gradients_equal_the_dense_reference(backend):
    """Each backend's loss and gradients against `mlsae.model.reference.ReferenceSAE`."""
    torch.manual_seed(0)
    model = MLSAE(16, 256, 4, auxk=8, dead_tokens_threshold=10)
    model.backend = backend
    with torch.no_grad():
        model.pre_encoder_bias.normal_(0, 0.1)
    model.update_dead_latents(torch.arange(256) % 2, 10)  # odd latents stay live
    x = torch.randn(2, 3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    reference = ReferenceSAE.from_mlsae(model)
    expected = reference.loss(x, model.dead_mask, 1 / 32, mask)
    expected.backward()
    loss = mlsae_loss(x, model.forward_standardized(x), mask, 1 / 32)
    loss.total.backward()
    torch.testing.assert_close(loss.total, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, ours, theirs in [
        ("encoder", model.encoder.weight.grad, reference.encoder.grad),
        ("decoder", model.decoder.weight.grad, reference.decoder.grad),
        ("bias", model.pre_encoder_bias.grad, reference.pre_encoder_bias.grad),
    ]:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_auxk_selects_only_dead_latents():
    torch.manual_seed(1)
    model = MLSAE(16, 64, 4, auxk=8, dead_tokens_threshold=10)
    fired = torch.ones(64, dtype=torch.long)
    fired[[3, 10, 11, 40, 41, 42]] = 0
    model.update_dead_latents(fired, 25)
    with torch.no_grad():
        out = model(torch.randn(3, 4, 16))
    assert out.auxk.indices.shape[-1] == 6  # min(auxk, number of dead latents)
    assert set(out.auxk.indices.unique().tolist()) <= {3, 10, 11, 40, 41, 42}
    assert out.dead.item() == pytest.approx(6 / 64)
    torch.testing.assert_close(out.auxk_recons, dense(out.auxk, 64) @ model.decoder.weight.T)


def test_no_dead_latents_gives_an_empty_auxk_selection():
    model = MLSAE(16, 64, 4, auxk=8)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16))
    assert out.auxk.values.shape == (2, 3, 0)
    assert torch.equal(out.auxk_recons, torch.zeros(2, 3, 16))
    assert out.dead.item() == 0


def test_auxk_none_works():
    model = MLSAE(16, 64, 4, auxk=None)
    out = model(torch.randn(2, 3, 16))
    assert out.auxk is None and out.auxk_recons is None
    out.recons.sum().backward()
    assert model.encoder.weight.grad is not None


def test_dead_latent_counting_in_tokens_and_reset():
    model = MLSAE(8, 6, 2, auxk=4, dead_tokens_threshold=100)
    fired = torch.tensor([1, 0, 0, 3, 0, 0])
    model.update_dead_latents(fired, 60)
    assert model.tokens_since_fired.tolist() == [0, 60, 60, 0, 60, 60]
    assert not model.dead_mask.any()
    model.update_dead_latents(torch.tensor([0, 0, 1, 0, 0, 0]), 40)
    assert model.tokens_since_fired.tolist() == [40, 100, 0, 40, 100, 100]
    assert model.dead_mask.tolist() == [False, True, False, False, True, True]
    assert model.dead_latent_indices().tolist() == [1, 4, 5]
    model.update_dead_latents(torch.tensor([0, 1, 0, 0, 0, 0]), 10)
    assert model.dead_latent_indices().tolist() == [4, 5]


def test_forward_does_not_advance_dead_latent_state():
    model = MLSAE(8, 16, 2, auxk=4, dead_tokens_threshold=5)
    before = model.tokens_since_fired.clone()
    model(torch.randn(4, 3, 8))
    with torch.no_grad():
        model(torch.randn(4, 3, 8))
    assert torch.equal(model.tokens_since_fired, before)


def test_fired_counts_respects_threshold_and_mask():
    model = MLSAE(8, 5, 2, auxk=None, dead_threshold=0.5)
    topk = TopK(
        torch.tensor([[[1.0, 0.2], [0.7, 0.9]]]),
        torch.tensor([[[0, 1], [1, 4]]]),
    )
    assert model.fired_counts(topk).tolist() == [1, 1, 0, 0, 1]
    mask = torch.tensor([[True, False]])
    assert model.fired_counts(topk, mask).tolist() == [1, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((8, 16, 17), {}, "k"),
        ((8, 16, 2), {"auxk": 32}, "auxk"),
        ((0, 16, 2), {}, "n_inputs"),
        ((8, -1, 2), {}, "n_latents"),
        ((8, 16, 0), {}, "k"),
    ],
)
def test_constructor_rejects_bad_sizes(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLSAE(*args, **kwargs)


def test_forward_rejects_bad_inputs():
    model = MLSAE(8, 16, 2, auxk=4)
    with pytest.raises(ValueError, match="n_inputs=8"):
        model(torch.randn(2, 7))
    with pytest.raises(ValueError, match="floating"):
        model(torch.ones(2, 8, dtype=torch.long))


def test_any_leading_shape_and_empty_batch():
    model = MLSAE(8, 16, 2, auxk=4)
    with torch.no_grad():
        assert model(torch.randn(8)).recons.shape == (8,)
        assert model(torch.randn(0, 8)).recons.shape == (0, 8)
        assert model(torch.randn(2, 3, 4, 5, 8)).topk.indices.shape == (2, 3, 4, 5, 2)


def test_encode_returns_pre_relu_values_and_stats():
    torch.manual_seed(3)
    model = MLSAE(8, 16, 16, auxk=None)
    x = torch.randn(5, 8)
    encoded = model.encode(x)
    assert (encoded.topk.values < 0).any()
    torch.testing.assert_close(encoded.stats.mean, x.mean(-1, keepdim=True))
    recons = model.decode(TopK(encoded.topk.values.relu(), encoded.topk.indices), encoded.stats)
    torch.testing.assert_close(recons, model(x).recons)


def test_the_dense_reference_reproduces_the_golden_forward(golden, trained):
    """`ReferenceSAE` on the trained checkpoint's weights gives the original's outputs."""
    reference = ReferenceSAE.from_mlsae(trained)
    with torch.no_grad():
        out = reference(golden["x"])
    torch.testing.assert_close(out.recons, golden["fwd.recons"], rtol=1e-5, atol=1e-5)
    indices, order = out.indices.sort(dim=-1)
    torch.testing.assert_close(indices, golden["fwd.topk_indices"])
