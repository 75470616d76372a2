"""One prompt through the model: how long it may be, the forward pass the explorer keeps
(`PromptAnalysis`), what the latents do on it, the residual streams its interventions splice
in, and its metrics. `service.py` describes the conventions."""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.model.autoencoder import standardize
from mlsae.model.lightning import MLSAETransformer, ResidualStream
from mlsae.model.losses import layerwise_mse_and_var

from . import schemas

_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_UNBOUNDED_TOKENIZER = 10**9


@dataclass(frozen=True)
class PromptAnalysis:
    """What one forward pass of the transformer and the autoencoder gives for a prompt."""

    token_ids: Int[Tensor, "1 pos"]
    special: Bool[Tensor, " pos"]
    counted: Bool[Tensor, " pos"]
    """The positions that count (all but special ones, unless the model counts them)."""
    stream: ResidualStream
    """The residual stream after each layer's block (`raw`, in the transformer's space)
    and what the autoencoder encoded (`inputs`)."""
    values: Float[Tensor, "layer pos k"]
    """The selected activations after ReLU, 0 at positions that do not count."""
    indices: Int[Tensor, "layer pos k"]
    recons: Float[Tensor, "layer 1 pos d_model"]
    """The reconstructions in the transformer's space."""

    @property
    def n_positions(self) -> int:
        return self.token_ids.shape[1]

    @property
    def raw(self) -> Float[Tensor, "layer 1 pos d_model"]:
        return self.stream.raw

    @property
    def inputs(self) -> Float[Tensor, "layer 1 pos d_model"]:
        return self.stream.inputs

    @property
    def mask(self) -> Bool[Tensor, "1 pos"]:
        return self.counted[None]


def context_length(model: MLSAETransformer) -> int:
    """The most tokens the transformer takes: its position limit, else the tokenizer's,
    else the MLSAE's training length."""
    config = model.transformer.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    tokenizer_limit = getattr(model.transformer.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _UNBOUNDED_TOKENIZER:
        return tokenizer_limit
    return model.max_length


@torch.no_grad()
def analyse_tokens(model: MLSAETransformer, token_ids: Int[Tensor, "1 pos"]) -> PromptAnalysis:
    """The transformer's residual stream and the autoencoder's activations for one prompt."""
    stream = model.residual_stream(token_ids)
    output = model.autoencoder(stream.inputs)
    n_positions = token_ids.shape[1]
    counted = (
        stream.mask[0]
        if stream.mask is not None
        else torch.ones(n_positions, dtype=torch.bool, device=token_ids.device)
    )
    special = (
        stream.special[0]
        if stream.special is not None
        else model.transformer.special_token_mask(token_ids)[0]
    )
    values = output.topk.values[:, 0].masked_fill(~counted[None, :, None], 0.0)
    return PromptAnalysis(
        token_ids=token_ids,
        special=special,
        counted=counted,
        stream=stream,
        values=values,
        indices=output.topk.indices[:, 0],
        recons=model.to_transformer_space(output.recons),
    )


def latent_trace(analysis: PromptAnalysis, latent: int) -> schemas.LatentTrace:
    """One latent's activation at each layer and position, and its mean layer."""
    acts = torch.where(analysis.indices == latent, analysis.values, 0.0).sum(-1)
    weights = acts.sum(-1)
    total = float(weights.sum())
    layer_mean = None
    if total > 0:
        layers = torch.arange(len(weights), dtype=weights.dtype, device=weights.device)
        layer_mean = float((weights * layers).sum()) / total
    return schemas.LatentTrace(
        latent=latent, acts=acts.tolist(), max=float(acts.max()), layer_mean=layer_mean
    )


def activation_histograms(analysis: PromptAnalysis, bins: int) -> schemas.Histograms:
    """Per layer, a histogram of the nonzero selected activations at the positions that
    count, with bins shared by every layer, and how many selections are 0."""
    counted = analysis.values[:, analysis.counted]
    top = max(float(counted.max()) if counted.numel() else 0.0, 1e-6)
    counts, zeros = [], []
    for layer_values in counted:
        firing = layer_values[layer_values > 0]
        counts.append(torch.histc(firing, bins=bins, min=0.0, max=top).long().tolist())
        zeros.append(int(layer_values.numel() - firing.numel()))
    edges = torch.linspace(0.0, top, bins + 1).tolist()
    return schemas.Histograms(edges=edges, counts=counts, zeros=zeros)


def reconstructed_stream(analysis: PromptAnalysis) -> Float[Tensor, "layer 1 pos d_model"]:
    """The residual stream with every layer's reconstruction at the positions that count."""
    return torch.where(analysis.mask[None, :, :, None], analysis.recons, analysis.raw)


@torch.no_grad()
def steered_stream(
    model: MLSAETransformer,
    analysis: PromptAnalysis,
    latent: int,
    layer: int,
    factor: float,
    positions: list[int] | None,
) -> Float[Tensor, "layer 1 pos d_model"]:
    """The residual stream moved by `factor` along the latent's decoder direction after
    `layer`, at the `positions` that count (None: all of them)."""
    steered_positions = analysis.counted.clone()
    if positions is not None:
        chosen = torch.zeros_like(steered_positions)
        chosen[positions] = True
        steered_positions &= chosen
    inputs = analysis.inputs
    scale = standardize(inputs)[1].std if model.standardize else torch.ones_like(inputs[..., :1])
    direction = model.autoencoder.decoder.weight[:, latent].to(inputs.dtype)
    in_layer = torch.zeros(model.n_layers, dtype=torch.bool, device=inputs.device)
    in_layer[layer] = True
    where = in_layer[:, None, None, None] & steered_positions[None, None, :, None]
    step = torch.where(where, factor * scale * direction, 0.0)
    if model.lens is None:
        return analysis.raw + step
    shift = model.to_transformer_space(inputs + step) - model.to_transformer_space(inputs)
    return analysis.raw + torch.where(where, shift, 0.0)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@torch.no_grad()
def prompt_metrics(model: MLSAETransformer, analysis: PromptAnalysis) -> schemas.Metrics:
    """Per layer: FVU, MSE, L0, and the next-token loss and KL divergence with the layer's
    reconstruction spliced in."""
    stream = analysis.stream
    output = model.autoencoder(stream.inputs)
    mse, var = layerwise_mse_and_var(stream.inputs, output.recons, stream.mask)
    fired = (analysis.values > model.dead_threshold).sum(-1).float()
    n_counted = int(analysis.counted.sum())
    l0 = fired[:, analysis.counted].mean(-1) if n_counted else torch.full_like(mse, math.nan)
    spliced = model.spliced_metrics(analysis.token_ids, stream, analysis.recons)
    kl_per_position = spliced["kl"] / max(n_counted, 1)
    own_loss = float(spliced["loss_true"][0]) if analysis.n_positions > 1 else math.nan
    layers = []
    for layer in range(model.n_layers):
        loss = float(spliced["loss_pred"][layer]) if analysis.n_positions > 1 else math.nan
        layers.append(
            schemas.LayerMetrics(
                layer=layer,
                block=model.layers[layer],
                fvu=_finite_or_none(float(mse[layer] / var[layer])),
                mse=_finite_or_none(float(mse[layer])),
                l0=_finite_or_none(float(l0[layer])),
                loss=_finite_or_none(loss),
                loss_delta=_finite_or_none(loss - own_loss),
                kl_div=_finite_or_none(float(kl_per_position[layer])),
            )
        )
    return schemas.Metrics(n_tokens=n_counted, loss=_finite_or_none(own_loss), layers=layers)


@torch.no_grad()
def training_metrics(model: MLSAETransformer, analysis: PromptAnalysis) -> dict[str, float | None]:
    """The model's training metrics (`train/fvu/layer_0`, ...) on the prompt."""
    output = model.autoencoder(analysis.inputs)
    metrics = model.train_metrics.clone()
    metrics.reset()
    values = metrics(
        inputs=analysis.inputs,
        recons=output.recons,
        values=output.topk.values,
        indices=output.topk.indices,
        mask=analysis.stream.mask,
    )
    return {name: _finite_or_none(float(value)) for name, value in values.items()}
