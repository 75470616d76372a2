"""The analysis of one prompt against independent computations: the autoencoder written out
densely, the transformer's own forward passes, the steering step built by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlsae.analysis import interventions
from mlsae.analysis.prompt import (
    PromptAnalysis,
    PromptError,
    activation_histograms,
    analyse_prompt,
    dense_activations,
    latent_activations,
    mean_layer,
    prompt_metrics,
    prompt_token_ids,
    training_metrics,
)
from mlsae.lm.lens import TunedLens
from mlsae.lm.transformer import Transformer
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import tiny_model

PROMPT = "<|endoftext|>The cat sat on the mat, and the dog sat on the rug."
"""A special token first: it is left out of the autoencoder's positions."""

EOS = 0


def with_lens(model: MLSAETransformer) -> MLSAETransformer:
    """`model` with a random tuned lens (the tiny model has none of its own)."""
    generator = torch.Generator().manual_seed(2)
    lens = TunedLens(model.n_inputs, model.transformer.n_blocks)
    for translator in lens.layer_translators:
        translator.weight.copy_(0.1 * torch.randn(translator.weight.shape, generator=generator))
        translator.bias.copy_(0.1 * torch.randn(translator.bias.shape, generator=generator))
    model.lens = lens
    return model


@pytest.fixture(scope="module", params=["plain", "lens"])
def model(request: pytest.FixtureRequest) -> MLSAETransformer:
    model = tiny_model()
    return with_lens(model) if request.param == "lens" else model


@pytest.fixture(scope="module")
def analysis(model: MLSAETransformer) -> PromptAnalysis:
    return analyse_prompt(model, PROMPT)


class Dense:
    """The prompt through the model, the autoencoder's maths written out with dense
    matrices: standardise, encode every latent, keep the k largest, ReLU, decode."""

    def __init__(self, model: MLSAETransformer, prompt: str = PROMPT) -> None:
        ae = model.autoencoder
        self.tokens = torch.tensor([model.transformer.tokenizer(prompt)["input_ids"]])
        self.counted = self.tokens[0] != EOS
        self.raw = model.transformer.residual_stream(self.tokens)  # the block outputs
        zeroed = self.raw * self.counted[None, None, :, None]
        self.inputs = zeroed if model.lens is None else model.lens(zeroed, model.layers)
        mean = self.inputs.mean(-1, keepdim=True)
        self.std = (self.inputs - mean).std(-1, keepdim=True)
        standardised = (self.inputs - mean) / (self.std + 1e-5)
        pre = (standardised - ae.pre_encoder_bias) @ ae.encoder.weight.T
        top = pre.topk(model.k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        self.latents = latents[:, 0] * self.counted[None, :, None]
        decoded = latents @ ae.decoder.weight.T + ae.pre_encoder_bias
        self.encoded_recons = decoded * self.std + mean
        self.recons = (
            self.encoded_recons
            if model.lens is None
            else model.lens.inverse(self.encoded_recons, model.layers)
        )
        self.own_logits = model.transformer.model(input_ids=self.tokens).logits[0]

    def reconstructed(self) -> torch.Tensor:
        return torch.where(self.counted[None, None, :, None], self.recons, self.raw)


def kl_per_position(own: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    log_own, log_after = own.log_softmax(-1), after.log_softmax(-1)
    return (log_after.exp() * (log_after - log_own)).sum(-1)


# The forward pass -------------------------------------------------------------------------------


@torch.no_grad()
def test_the_analysis_matches_a_dense_recomputation(
    model: MLSAETransformer, analysis: PromptAnalysis
) -> None:
    dense = Dense(model)
    assert torch.equal(analysis.token_ids, dense.tokens)
    assert analysis.special.tolist() == (~dense.counted).tolist()
    assert analysis.counted.tolist() == dense.counted.tolist()
    torch.testing.assert_close(analysis.raw, dense.raw)
    torch.testing.assert_close(analysis.inputs, dense.inputs)
    torch.testing.assert_close(analysis.scale, dense.std)
    torch.testing.assert_close(dense_activations(analysis, model.n_latents), dense.latents)
    torch.testing.assert_close(analysis.encoded_recons, dense.encoded_recons, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(analysis.recons, dense.recons, atol=1e-4, rtol=1e-4)
    assert (analysis.values[:, ~dense.counted] == 0).all()


@torch.no_grad()
def test_a_latent_and_its_mean_layer(model: MLSAETransformer, analysis: PromptAnalysis) -> None:
    dense = Dense(model)
    latent = int(dense.latents.amax(dim=(0, 1)).argmax())
    acts = latent_activations(analysis, latent)
    torch.testing.assert_close(acts, dense.latents[..., latent])
    weights = acts.sum(-1)
    expected = sum(layer * float(weight) for layer, weight in enumerate(weights)) / float(
        weights.sum()
    )
    assert float(mean_layer(acts)) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(float(mean_layer(torch.zeros_like(acts))))


def test_histograms_count_every_selection(analysis: PromptAnalysis) -> None:
    histograms = activation_histograms(analysis, bins=5)
    counted = analysis.values[:, analysis.counted]
    assert histograms.edges[-1] == pytest.approx(float(counted.max()))
    for layer, layer_values in enumerate(counted):
        assert int(histograms.counts[layer].sum()) == int((layer_values > 0).sum())
        assert int(histograms.counts[layer].sum() + histograms.zeros[layer]) == layer_values.numel()


# Metrics ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_metrics_match_a_dense_recomputation(
    model: MLSAETransformer, analysis: PromptAnalysis
) -> None:
    dense = Dense(model)
    metrics = prompt_metrics(model, analysis)
    counted = dense.counted
    assert metrics.n_counted == int(counted.sum())
    predicted = counted[:-1]  # positions whose next token is predicted
    own_loss = F.cross_entropy(dense.own_logits[:-1][predicted], dense.tokens[0, 1:][predicted])
    assert metrics.own_loss == pytest.approx(float(own_loss), rel=1e-5)
    train = training_metrics(model, analysis)
    for layer, block in enumerate(model.layers):
        inputs = dense.inputs[layer, 0, counted]
        error = dense.encoded_recons[layer, 0, counted] - inputs
        mse, var = error.pow(2).mean(), inputs.flatten().var()
        l0 = (dense.latents[layer, counted] > model.dead_threshold).sum(-1).float().mean()
        assert float(metrics.mse[layer]) == pytest.approx(float(mse), rel=1e-4)
        assert float(metrics.fvu[layer]) == pytest.approx(float(mse / var), rel=1e-4)
        assert float(metrics.l0[layer]) == pytest.approx(float(l0))
        assert train[f"train/fvu/layer_{block}"] == pytest.approx(float(mse / var), rel=1e-4)
        assert train[f"train/l0/layer_{block}"] == pytest.approx(float(l0))

        spliced = model.transformer.forward_at_layer(dense.reconstructed(), layer, "logits")[0]
        loss = F.cross_entropy(spliced[:-1][predicted], dense.tokens[0, 1:][predicted])
        kl = kl_per_position(dense.own_logits, spliced)[counted].mean()
        assert float(metrics.loss[layer]) == pytest.approx(float(loss), rel=1e-4)
        assert float(metrics.loss_delta[layer]) == pytest.approx(float(loss - own_loss), abs=1e-4)
        assert float(metrics.kl_div[layer]) == pytest.approx(float(kl), rel=1e-3, abs=1e-6)


def test_a_one_token_prompt_has_no_loss_but_its_other_metrics(model: MLSAETransformer) -> None:
    analysis = analyse_prompt(model, "Return")
    assert analysis.n_positions == 1
    metrics = prompt_metrics(model, analysis)
    assert math.isnan(metrics.own_loss) and metrics.loss.isnan().all()
    assert metrics.fvu.isfinite().all() and (metrics.l0 == model.k).all()


# Interventions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 3])
@torch.no_grad()
def test_spliced_logits_are_the_transformers_own(
    model: MLSAETransformer, analysis: PromptAnalysis, layer: int
) -> None:
    dense = Dense(model)
    stream = interventions.reconstructed_stream(analysis)
    torch.testing.assert_close(stream, dense.reconstructed(), atol=1e-4, rtol=1e-4)
    logits = interventions.spliced_logits(model, analysis, layer, stream)
    expected = model.transformer.forward_at_layer(stream, layer, "logits", dense.tokens)[0]
    torch.testing.assert_close(logits.spliced, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits.own, dense.own_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(interventions.model_logits(model, analysis), dense.own_logits)
    torch.testing.assert_close(
        logits.kl_div, kl_per_position(dense.own_logits, expected).clamp(min=0), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("positions", [None, [0, 2, 5], []])
@torch.no_grad()
def test_steering_adds_the_scaled_decoder_column(
    model: MLSAETransformer, analysis: PromptAnalysis, positions: list[int] | None
) -> None:
    latent, layer, factor = 7, 2, 3.0
    dense = Dense(model)
    steered = interventions.steered_stream(model, analysis, latent, layer, factor, positions)
    chosen = dense.counted.clone()  # the special position 0 is never steered
    if positions is not None:
        chosen &= torch.isin(torch.arange(len(chosen)), torch.tensor(positions, dtype=torch.long))
    step = factor * dense.std[layer, 0] * model.autoencoder.decoder.weight[:, latent]
    expected = dense.raw.clone()
    if model.lens is None:
        expected[layer, 0, chosen] += step[chosen]
    else:
        moved = dense.inputs[layer : layer + 1].clone()
        moved[0, 0, chosen] += step[chosen]
        block = [model.layers[layer]]
        shift = model.lens.inverse(moved, block) - model.lens.inverse(
            dense.inputs[layer : layer + 1], block
        )
        expected[layer, 0, chosen] += shift[0, 0, chosen]
    torch.testing.assert_close(steered, expected, atol=1e-4, rtol=1e-4)
    unsteered = torch.ones(steered.shape[:3], dtype=torch.bool)
    unsteered[layer, 0, chosen] = False
    assert torch.equal(steered[unsteered], analysis.raw[unsteered])  # untouched, exactly


def test_steering_refuses_what_does_not_fit(model: MLSAETransformer, analysis: PromptAnalysis):
    steer = interventions.steered_stream
    with pytest.raises(PromptError, match="positions must be in"):
        steer(model, analysis, 0, 0, 1.0, [analysis.n_positions])
    with pytest.raises(PromptError, match="layer must be in"):
        steer(model, analysis, 0, model.n_layers, 1.0)
    with pytest.raises(PromptError, match="latent must be in"):
        steer(model, analysis, model.n_latents, 0, 1.0)
    with pytest.raises(PromptError, match="finite"):
        steer(model, analysis, 0, 0, math.nan)


# Tokens -----------------------------------------------------------------------------------------


def test_prompts_are_checked_against_the_context_length(
    model: MLSAETransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = model.transformer.tokenizer
    context = model.transformer.context_length
    assert context == 128  # the tiny model's max_position_embeddings
    full = tokenizer.decode(tokenizer("ab " * 200)["input_ids"][:context])
    assert len(prompt_token_ids(model, full)) == context
    with pytest.raises(PromptError, match=f"more than the {context} "):
        prompt_token_ids(model, full + " ab")
    with pytest.raises(PromptError, match="more than the 3 "):
        prompt_token_ids(model, "a b c d", max_tokens=3)
    # Without a known context, the length the MLSAE was trained on.
    monkeypatch.setattr(Transformer, "context_length", property(lambda self: None))
    with pytest.raises(PromptError, match=f"more than the {model.max_length} "):
        prompt_token_ids(model, full)
    with pytest.raises(PromptError, match="empty"):
        prompt_token_ids(model, "")
    with pytest.raises(PromptError, match="character 1 is a lone surrogate"):
        prompt_token_ids(model, "a\udcffb")


# The autoencoder runs once ----------------------------------------------------------------------


def test_the_autoencoder_runs_once_per_prompt_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    calls = []
    forward = model.autoencoder.forward

    def counted(*args, **kwargs):
        calls.append(args)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.autoencoder, "forward", counted)
    analysis = analyse_prompt(model, PROMPT)
    prompt_metrics(model, analysis)
    training_metrics(model, analysis)
    dense_activations(analysis, model.n_latents)
    activation_histograms(analysis, 8)
    for stream in (
        interventions.reconstructed_stream(analysis),
        interventions.steered_stream(model, analysis, 3, 1, 2.0),
    ):
        interventions.spliced_logits(model, analysis, 1, stream)
    assert len(calls) == 1
