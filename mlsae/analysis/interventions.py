"""Interventions on one prompt's residual stream (`mlsae.analysis.prompt.PromptAnalysis`):
a stream is spliced in after one layer's block and the model runs the rest.

- Reconstruction (`reconstructed_stream`): the residual stream after each layer's block is
  replaced by the autoencoder's reconstruction (in the transformer's space) at the
  positions that count.
- Steering (`steered_stream`): `factor * std * d` is added to the residual stream after
  the layer's block, where `d` is the latent's unit-norm decoder column and `std` the
  standard deviation that standardisation removed at that position (1 without
  standardisation), so `factor` is the change in the latent's contribution in the
  autoencoder's space (comparable to its activations). With a tuned lens the step is
  mapped back through the lens's inverse. Special positions are not steered. For a stack of
  per-layer SAEs, the step is what raising the latent of that layer's SAE by `factor`
  adds to its reconstruction (`mlsae.analysis.stack_prompt.steering_step`).
- `spliced_logits` compares the logits with such a stream spliced in at one layer against
  the model's own, both from one forward pass of a batch of two. KL divergences are
  KL(intervened || model's own), per position, in nats
  (`mlsae.metrics.spliced.logit_kldiv_per_position`).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mlsae.analysis.prompt import (
    PromptAnalysis,
    PromptError,
    PromptModel,
    check_latent,
    check_layer,
)
from mlsae.analysis.source import StackSource
from mlsae.analysis.stack_prompt import logits_with_layer_replaced, steering_step
from mlsae.metrics.spliced import logit_kldiv_per_position


def reconstructed_stream(analysis: PromptAnalysis) -> Float[Tensor, "layer 1 pos d_model"]:
    """The residual stream with every layer's reconstruction at the positions that count."""
    return torch.where(analysis.mask[None, :, :, None], analysis.recons, analysis.raw)


def steering_positions(
    analysis: PromptAnalysis, positions: Iterable[int] | None
) -> tuple[int, ...] | None:
    """The positions to steer, sorted and each once (None: every position that counts);
    a `PromptError` for one outside the prompt."""
    if positions is None:
        return None
    chosen = sorted(set(positions))
    outside = [pos for pos in chosen if not 0 <= pos < analysis.n_positions]
    if outside:
        raise PromptError(f"positions must be in [0, {analysis.n_positions}), not {outside[:5]}")
    return tuple(chosen)


@torch.no_grad()
def steered_stream(
    model: PromptModel,
    analysis: PromptAnalysis,
    latent: int,
    layer: int,
    factor: float,
    positions: Iterable[int] | None = None,
) -> Float[Tensor, "layer 1 pos d_model"]:
    """The residual stream moved by `factor` along the latent's decoder direction after
    `layer`, at the `positions` that count (None: all of them)."""
    check_layer(model, layer)
    check_latent(model, latent)
    if not math.isfinite(factor):
        raise PromptError("factor must be a finite number")
    steered = analysis.counted.clone()
    chosen = steering_positions(analysis, positions)
    if chosen is not None:
        in_chosen = torch.zeros_like(steered)
        in_chosen[torch.tensor(chosen, dtype=torch.long, device=steered.device)] = True
        steered &= in_chosen
    inputs = analysis.inputs
    if isinstance(model, StackSource):
        d_sae = model.stack[layer].d_sae
        if latent >= d_sae:
            raise PromptError(f"latent must be in [0, {d_sae}) at layer {layer}, not {latent}")
        step = steering_step(model, inputs[layer], layer, latent, factor, steered)
        stream = analysis.raw.clone()
        stream[layer] += step
        return stream
    direction = model.autoencoder.decoder.weight[:, latent].to(inputs.dtype)
    in_layer = torch.zeros(model.n_layers, dtype=torch.bool, device=inputs.device)
    in_layer[layer] = True
    where = in_layer[:, None, None, None] & steered[None, None, :, None]
    step = torch.where(where, factor * analysis.scale * direction, 0.0)
    if model.lens is None:
        return analysis.raw + step
    shift = model.to_transformer_space(inputs + step) - model.to_transformer_space(inputs)
    return analysis.raw + torch.where(where, shift, 0.0)


@dataclass(frozen=True)
class SplicedLogits:
    """The model's own logits and those with another residual stream spliced in."""

    own: Float[Tensor, "pos vocab"]
    spliced: Float[Tensor, "pos vocab"]
    kl_div: Float[Tensor, " pos"]
    """KL(spliced || own) of the next-token distributions at each position, in nats."""


@torch.no_grad()
def model_logits(model: PromptModel, analysis: PromptAnalysis) -> Float[Tensor, "pos vocab"]:
    """The model's own logits on the prompt."""
    logits = model.transformer.model(input_ids=analysis.token_ids, use_cache=False).logits
    return logits[0].float()


@torch.no_grad()
def spliced_logits(
    model: PromptModel,
    analysis: PromptAnalysis,
    layer: int,
    stream: Float[Tensor, "layer 1 pos d_model"],
) -> SplicedLogits:
    """The logits with `stream[layer]` spliced in after `layer`'s block against the
    model's own, from one forward pass: splicing the unmodified stream gives the model's
    own."""
    check_layer(model, layer)
    stack = torch.cat([analysis.raw, stream], dim=1)
    tokens = analysis.token_ids.expand(2, -1)
    if isinstance(model, StackSource):
        logits = logits_with_layer_replaced(model, tokens, layer, stack[layer]).float()
    else:
        logits = model.transformer.forward_at_layer(stack, layer, "logits", tokens).float()
    own, spliced = logits[0], logits[1]
    return SplicedLogits(own=own, spliced=spliced, kl_div=position_kldiv(own, spliced))


def position_kldiv(
    own: Float[Tensor, "pos vocab"], spliced: Float[Tensor, "pos vocab"]
) -> Float[Tensor, " pos"]:
    """KL(spliced || own) at each position (rounding can make it a hair below 0: 0)."""
    return logit_kldiv_per_position(own, spliced).clamp(min=0.0)
