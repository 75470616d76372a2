"""The ablated losses behind the CE loss recovered, against stacks built by hand, and the
recovered share at its two ends: an exact reconstruction and one equal to the ablation."""

import pytest
import torch

from mlsae.lm.splice import ablated_losses
from mlsae.metrics import LayerwiseLossRecovered
from mlsae.metrics.spliced import next_token_loss
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS

TINY = str(GOLDENS / "tiny-gpt-neox-2")


@pytest.fixture(scope="module", params=[False, True], ids=["masked", "count-special"])
def model_and_tokens(request):
    torch.manual_seed(0)
    model = MLSAETransformer(
        model_name=TINY,
        expansion_factor=2,
        k=4,
        auxk=8,
        max_length=16,
        count_special_tokens=request.param,
    )
    tokens = torch.randint(1, 500, (2, 16))
    tokens[:, 0] = 0  # EOS: a special position
    assert (model.residual_stream(tokens).mask is None) == request.param
    return model, tokens


def by_hand(model, tokens, position, how):
    """The loss with layer `position` replaced by zeros or its mean, built directly."""
    stream = model.residual_stream(tokens)
    if stream.mask is None:
        layer = stream.zeroed()[position]
        value = torch.zeros(layer.shape[-1]) if how == "zero" else layer.mean(dim=(0, 1))
        replaced = value.expand_as(layer).clone()
    else:
        layer = stream.raw[position].clone()
        value = torch.zeros(layer.shape[-1]) if how == "zero" else layer[stream.mask].mean(0)
        replaced = layer
        replaced[stream.mask] = value
    stack = stream.raw.clone()
    stack[position] = replaced
    logits = model.transformer.forward_at_layer(stack, position, "logits")
    return next_token_loss(logits, tokens, stream.mask)


def test_ablated_losses_replace_the_positions_the_reconstruction_replaces(model_and_tokens):
    model, tokens = model_and_tokens
    stream = model.residual_stream(tokens)
    losses = ablated_losses(model.transformer, tokens, stream)
    assert losses["loss_zero"].shape == losses["loss_mean"].shape == (model.n_layers,)
    for position in range(model.n_layers):
        for how in ("zero", "mean"):
            expected = by_hand(model, tokens, position, how)
            torch.testing.assert_close(losses[f"loss_{how}"][position], expected)
    counted = 2 * 15 if stream.mask is None else stream.mask[:, :-1].sum()
    assert losses["n_predictions"].item() == counted


def recovered(model, tokens, recons):
    stream = model.residual_stream(tokens)
    spliced = model.spliced_metrics(tokens, stream, recons)
    losses = ablated_losses(model.transformer, tokens, stream)
    return {
        how: LayerwiseLossRecovered(model.n_layers, how)(
            loss_true=spliced["loss_true"], loss_pred=spliced["loss_pred"], **losses
        )
        for how in ("zero", "mean")
    }


def test_recovered_is_one_for_an_exact_reconstruction(model_and_tokens):
    model, tokens = model_and_tokens
    stream = model.residual_stream(tokens)
    exact = stream.zeroed() if stream.mask is None else stream.raw
    for values in recovered(model, tokens, exact).values():
        torch.testing.assert_close(values, torch.ones(model.n_layers), rtol=0, atol=1e-4)


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_recovered_is_zero_for_a_reconstruction_equal_to_the_ablation(model_and_tokens, how):
    model, tokens = model_and_tokens
    stream = model.residual_stream(tokens)
    kept = stream.zeroed() if stream.mask is None else stream.raw
    if how == "zero":
        recons = torch.zeros_like(kept)
    elif stream.mask is None:
        recons = kept.mean(dim=(1, 2), keepdim=True).expand_as(kept)
    else:
        recons = kept[:, stream.mask].mean(dim=1)[:, None, None].expand_as(kept)
    values = recovered(model, tokens, recons)[how]
    torch.testing.assert_close(values, torch.zeros(model.n_layers), rtol=0, atol=1e-4)
