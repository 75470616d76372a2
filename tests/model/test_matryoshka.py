"""Matryoshka (docs/variants.md): the prefixes' reconstructions and losses against a dense
reference, the gradients of the whole loss against dense autograd, the widths' checks and
the prefix metric."""

import pytest
import torch

from mlsae.cli import ConfigError
from mlsae.metrics.prefix_fvu import PrefixFVU
from mlsae.model.autoencoder import MLSAE
from mlsae.model.losses import layerwise_fvu, mlsae_loss
from mlsae.model.reference import ReferenceSAE
from mlsae.model.variants import resolve_variant

N_INPUTS, N_LATENTS, K = 16, 48, 3
WIDTHS = [4, 12, 30]


def mlsae(**options) -> MLSAE:
    torch.manual_seed(0)
    model = MLSAE(N_INPUTS, N_LATENTS, K, auxk=8, architecture="matryoshka", **options)
    model.tokens_since_fired[-10:] = model.dead_tokens_threshold  # some dead latents
    return model.double()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, N_INPUTS, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 5, generator=generator) > 0.2
    return x, mask


@pytest.mark.parametrize(
    "options",
    [
        dict(matryoshka_widths=WIDTHS, batchtopk_capacity=N_LATENTS),
        dict(matryoshka_widths=WIDTHS, batchtopk_capacity=N_LATENTS, batchtopk_pool="layer"),
        dict(matryoshka_widths=[*WIDTHS, N_LATENTS], matryoshka_selection="topk"),
    ],
    ids=["batchtopk", "batchtopk-per-layer", "topk"],
)
def test_prefix_losses_and_gradients_match_the_dense_reference(options):
    model = mlsae(**options)
    assert model.variant.widths == (*WIDTHS, N_LATENTS)
    reference = ReferenceSAE.from_mlsae(model)
    x, mask = inputs()
    result = model.forward_standardized(x, mask)
    expected = reference(x, model.dead_mask, mask)
    assert len(result.prefix_recons) == len(expected.prefix_recons) == 4
    for ours, theirs in zip(result.prefix_recons, expected.prefix_recons, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert result.prefix_recons[-1] is result.output.recons
    loss = mlsae_loss(x, result, mask, 1 / 32)
    for fvu, recons in zip(loss.prefix_fvu, expected.prefix_recons, strict=True):
        torch.testing.assert_close(fvu, layerwise_fvu(x, recons, mask).mean())
    assert loss.fvu is loss.prefix_fvu[-1]
    # The FVU term is the plain sum over prefixes (Bussmann et al.), plus AuxK's.
    torch.testing.assert_close(loss.total, sum(loss.prefix_fvu) + loss.auxk / 32)
    assert loss.auxk > 0
    total = reference.loss(x, model.dead_mask, 1 / 32, mask)
    torch.testing.assert_close(loss.total, total)
    loss.total.backward()
    total.backward()
    torch.testing.assert_close(model.encoder.weight.grad, reference.encoder.grad)
    torch.testing.assert_close(model.decoder.weight.grad, reference.decoder.grad)
    torch.testing.assert_close(model.pre_encoder_bias.grad, reference.pre_encoder_bias.grad)


def test_a_prefix_decodes_only_its_latents():
    model = mlsae(matryoshka_widths=[8])
    x, mask = inputs()
    with torch.no_grad():
        result = model.forward_standardized(x, mask)
    topk = result.output.topk
    inner = torch.where(topk.indices < 8, topk.values, 0)
    expected = model.decode(topk._replace(values=inner), model._standardize(x)[1])
    torch.testing.assert_close(result.prefix_recons[0], expected)
    assert not torch.equal(result.prefix_recons[0], result.output.recons)


def test_inference_uses_the_threshold_and_still_gives_prefixes():
    model = mlsae(matryoshka_widths=WIDTHS).eval()
    model.batchtopk_threshold.fill_(0.1)
    x, _ = inputs()
    with torch.no_grad():
        result = model.forward_standardized(x)
    values = result.output.topk.values
    assert ((values == 0) | (values > 0.1)).all()
    assert len(result.prefix_recons) == 4


def test_the_widths_are_checked():
    assert resolve_variant("matryoshka", 2, 64).widths == (64,)
    assert resolve_variant("matryoshka", 2, 64, widths=[8, 64]).widths == (8, 64)
    assert resolve_variant("matryoshka", 2, 64, widths=[8]).selection == "batchtopk"
    with pytest.raises(ConfigError, match="must increase"):
        resolve_variant("matryoshka", 2, 64, widths=[16, 8])
    with pytest.raises(ConfigError, match="must not exceed n_latents"):
        resolve_variant("matryoshka", 2, 64, widths=[16, 128])
    with pytest.raises(ConfigError, match="positive"):
        resolve_variant("matryoshka", 2, 64, widths=[0, 8])
    with pytest.raises(ConfigError, match="applies to --architecture matryoshka"):
        resolve_variant("batchtopk", 2, 64, widths=[8])
    with pytest.raises(ConfigError, match="applies to --architecture matryoshka"):
        resolve_variant("topk", 2, 64, selection="topk")
    with pytest.raises(ConfigError, match="--batchtopk_capacity and --batchtopk_pool"):
        resolve_variant("matryoshka", 2, 64, capacity=8, selection="topk")
    assert "batchtopk_threshold" not in mlsae(matryoshka_selection="topk").state_dict()


def test_the_prefix_metric_averages_each_prefixs_fvu_over_layers():
    x, mask = inputs()
    halves = [x * 0.5, x * 0.9]
    metric = PrefixFVU(3, [4, 48])
    metric.update(inputs=x, prefix_recons=halves, mask=mask)
    metric.update(inputs=x, prefix_recons=halves, mask=mask)
    result = metric.compute()
    assert list(result) == ["fvu/prefix_4", "fvu/prefix_48"]
    for recons, value in zip(halves, result.values(), strict=True):
        expected = layerwise_fvu(x, recons, mask).mean().float()
        torch.testing.assert_close(value, expected)
