"""What splicing a reconstruction into the transformer costs, per layer.

The functions compare the logits of one forward pass with the true residual
stream spliced in (`logits_true`) against one with the reconstruction spliced in
(`logits_pred`). `mask` (`[batch, pos]`, True = counts) restricts them to the
positions that count; without it every position counts, as in the original.
The metric classes average the per-batch values of each layer over batches
(`LayerwiseRatio` with one weight per batch), except `LayerwiseLossRecovered`, which
weighs each batch by the predictions its losses average over.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.metrics.layerwise import LayerwiseRatio


def next_token_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting token p+1 from position p (positions that count)."""
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    )
    if mask is None:
        return losses.mean()
    weights = mask[:, :-1].flatten().float()
    return (losses * weights).sum() / weights.sum()


def count_predictions(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None = None
) -> Float[Tensor, ""]:
    """The number of next-token predictions `next_token_loss` averages over."""
    if mask is None:
        return torch.tensor(float(tokens.shape[0] * (tokens.shape[1] - 1)), device=tokens.device)
    return mask[:, :-1].sum().float()


def logit_mse(
    logits_true: Float[Tensor, "batch pos vocab"],
    logits_pred: Float[Tensor, "batch pos vocab"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""]:
    """Mean squared difference of the logits, over positions that count and the vocabulary."""
    if mask is None:
        return F.mse_loss(logits_true.float(), logits_pred.float())
    squared = (logits_true.float() - logits_pred.float()).pow(2).mean(dim=-1)
    weights = mask.float()
    return (squared * weights).sum() / weights.sum()


def logit_kldiv_per_position(
    logits_true: Float[Tensor, "... vocab"], logits_pred: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """KL(pred || true) of the next-token distributions at each position, in nats."""
    log_true = F.log_softmax(logits_true.float(), dim=-1)
    log_pred = F.log_softmax(logits_pred.float(), dim=-1)
    return F.kl_div(log_true, log_pred, log_target=True, reduction="none").sum(dim=-1)


def logit_kldiv(
    logits_true: Float[Tensor, "batch pos vocab"],
    logits_pred: Float[Tensor, "batch pos vocab"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""]:
    """KL(pred || true) of the next-token distributions, summed over positions that
    count and divided by the batch size (`kl_div(..., reduction="batchmean")`)."""
    if mask is None:
        log_true = F.log_softmax(logits_true.float(), dim=-1)
        log_pred = F.log_softmax(logits_pred.float(), dim=-1)
        return F.kl_div(log_true, log_pred, log_target=True, reduction="batchmean")
    per_position = logit_kldiv_per_position(logits_true, logits_pred)
    return (per_position * mask.float()).sum() / logits_true.shape[0]


class LayerwiseLossDelta(LayerwiseRatio):
    """CE loss with the reconstruction spliced in minus CE loss with the true stream."""

    def update(
        self, loss_true: Float[Tensor, " layer"], loss_pred: Float[Tensor, " layer"], **_: object
    ) -> None:
        self._add(loss_pred - loss_true)


class LayerwiseLogitMSE(LayerwiseRatio):
    """Mean squared difference of the logits (see `logit_mse`)."""

    def update(self, logit_mse: Float[Tensor, " layer"], **_: object) -> None:
        self._add(logit_mse)


class LayerwiseLogitKLDiv(LayerwiseRatio):
    """KL divergence of the next-token distributions summed over a sequence's positions
    (see `logit_kldiv`; the original's `val/logit/kldiv`)."""

    def update(self, logit_kldiv: Float[Tensor, " layer"], **_: object) -> None:
        self._add(logit_kldiv)


class LayerwiseLogitKLDivPerToken(LayerwiseRatio):
    """KL divergence of the next-token distributions per position that counts, in nats
    (`val/logit/kldiv_per_token`)."""

    def update(self, logit_kldiv_per_token: Float[Tensor, " layer"], **_: object) -> None:
        self._add(logit_kldiv_per_token)


class LayerwiseLossRecovered(LayerwiseRatio):
    """The share of the CE loss increase of an ablation that splicing the reconstruction
    recovers, `(loss_ablated - loss_pred) / (loss_ablated - loss_true)`, where each loss is
    the mean over every prediction of every batch (SAELens' `ce_loss_score`): 1 when the
    reconstruction is exact, 0 when it is as bad as the ablation.

    `ablation` names the ablated loss it reads: `loss_zero` (the layer's stream replaced by
    zeros) or `loss_mean` (by its mean vector).
    """

    def __init__(self, n_layers: int, ablation: Literal["zero", "mean"]) -> None:
        super().__init__(n_layers, weight_per_layer=True)
        if ablation not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', not {ablation!r}")
        self.ablation = ablation

    def update(
        self,
        loss_true: Float[Tensor, " layer"],
        loss_pred: Float[Tensor, " layer"],
        n_predictions: Float[Tensor, ""],
        **losses: Tensor,
    ) -> None:
        loss_ablated = losses[f"loss_{self.ablation}"]
        self._add(
            n_predictions * (loss_ablated - loss_pred), n_predictions * (loss_ablated - loss_true)
        )
