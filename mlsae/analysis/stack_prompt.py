"""One prompt through a stack of per-layer SAEs (`mlsae.analysis.source.StackSource`): what
`mlsae.analysis.prompt` and `mlsae.analysis.interventions` do with an MLSAE, done with each
layer's own SAE at its own site.

Each SAE reads its site unmasked (special tokens included, as it was trained) and its
reconstruction replaces that site's activations. Activations are the SAEs' own, after
their activation functions; there is no standardisation, so a steering factor is a change
of the latent's activation itself.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.analysis.source import StackSource, padded_latents
from mlsae.cli import ConfigError
from mlsae.lm.stream import ResidualStream
from mlsae.metrics.spliced import logit_kldiv, next_token_loss
from mlsae.model.types import TopK


class StackPass(NamedTuple):
    """One forward pass of the transformer and every SAE of the stack."""

    activations: Float[Tensor, "layer batch pos width"]
    """What each SAE read, at its own site."""

    recons: Float[Tensor, "layer batch pos width"]
    """Each SAE's reconstruction of it."""

    topk: TopK
    """`[layer, batch, pos, k]` the latents that fire, after the activation function,
    padded with zeros to the most that fire in one vector."""


def check_explorable(source: StackSource) -> None:
    """A `ConfigError` unless every SAE of the stack reconstructs its own site (no
    transcoders) and all of them read vectors of one width, as one prompt's analysis
    holds every layer in one tensor."""
    for sae, name in zip(source.stack, source.stack.names, strict=True):
        if sae.is_transcoder:
            raise ConfigError(
                f"{name} is a transcoder ({sae.site} to {sae.output_site}): a prompt's "
                "analysis takes SAEs that reconstruct the site they read"
            )
    widths = sorted({sae.d_in for sae in source.stack})
    if len(widths) > 1:
        raise ConfigError(
            f"the SAEs read vectors of widths {widths}: a prompt's analysis takes SAEs of one "
            "width (leave out the attn_z ones, or analyse them apart)"
        )


@torch.no_grad()
def run_stack(source: StackSource, tokens: Int[Tensor, "batch pos"]) -> StackPass:
    """The activations, reconstructions and latents of every SAE of the stack."""
    check_explorable(source)
    activations = source.read(tokens)
    inputs = list(zip(source.stack, activations, strict=True))
    topk, _ = padded_latents([sae.encode_sparse(x) for sae, x in inputs])
    recons = torch.stack([sae(x) for sae, x in inputs])
    return StackPass(torch.stack(activations), recons, topk)


@torch.no_grad()
def stack_spliced_metrics(
    source: StackSource,
    tokens: Int[Tensor, "batch pos"],
    stream: ResidualStream,
    recons: Float[Tensor, "layer batch pos width"],
) -> dict[str, Float[Tensor, " layer"]]:
    """Per layer, as `mlsae.lm.splice.spliced_metrics` gives them for an MLSAE: the model's
    own loss (`loss_true`), the loss with the layer's reconstruction in place of its site's
    activations at the positions that count (`loss_pred`), and the KL divergence summed
    over those positions (`kl`) and per position that counts (`kl_per_token`)."""
    tokens = tokens.to(source.device)
    mask = stream.mask
    own = source.transformer.model(input_ids=tokens, use_cache=False).logits
    loss_pred, kl = [], []
    for position in range(source.n_layers):
        logits = source.logits_with_replaced(tokens, position, recons[position], mask)
        loss_pred.append(next_token_loss(logits, tokens, mask))
        kl.append(logit_kldiv(own, logits, mask))
    kl_sums = torch.stack(kl)
    n_counted = stream.n_counted().to(tokens.device)
    return {
        "loss_true": next_token_loss(own, tokens, mask).expand(source.n_layers),
        "loss_pred": torch.stack(loss_pred),
        "kl": kl_sums,
        "kl_per_token": kl_sums * tokens.shape[0] / n_counted.clamp(min=1),
    }


@torch.no_grad()
def steering_step(
    source: StackSource,
    activations: Float[Tensor, "batch pos width"],
    layer: int,
    latent: int,
    factor: float,
    steered: Bool[Tensor, " pos"],
) -> Float[Tensor, "batch pos width"]:
    """What raising `latent` of the SAE at `layer` (a position in the stack) by `factor` at
    the `steered` positions adds to that SAE's reconstruction of `activations`."""
    sae = source.stack[layer]
    acts = sae.encode(activations)
    raised = acts.clone()
    raised[:, steered, latent] += factor
    return torch.where(steered[None, :, None], sae.decode(raised) - sae.decode(acts), 0.0)


@torch.no_grad()
def logits_with_layer_replaced(
    source: StackSource,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    replacement: Float[Tensor, "batch pos width"],
) -> Float[Tensor, "batch pos vocab"]:
    """The logits with the site of the SAE at `layer` (a position in the stack) replaced,
    `replacement` in the terms that SAE reads."""
    return source.logits_with_replaced(tokens, layer, replacement)
