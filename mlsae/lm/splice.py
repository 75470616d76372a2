"""What splicing a reconstruction into the model costs, one layer at a time, and what
ablating each layer costs, the baselines of the loss recovered."""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.lm.stream import ResidualStream
from mlsae.lm.transformer import Transformer
from mlsae.metrics.spliced import count_predictions, logit_kldiv, logit_mse, next_token_loss


def spliced_metrics(
    transformer: Transformer,
    tokens: Int[Tensor, "batch pos"],
    stream: ResidualStream,
    recons: Float[Tensor, "layer batch pos d_model"],
) -> dict[str, Float[Tensor, " layer"]]:
    """Per layer: CE loss with the true stream and with the reconstruction spliced in at
    that layer's site (`loss_true`, `loss_pred`), logit MSE (`mse`), KL divergence summed
    over each sequence's positions that count (`kl`, the original's) and per position that
    counts (`kl_per_token`); the model runs once per layer, never holding logits of every
    layer.

    With special tokens counted (the original's numbers), the "true" stream is the zeroed
    one the autoencoder saw; otherwise it is the model's own, and the reconstruction
    replaces it only at the positions that count.
    """
    return spliced_metrics_each(transformer, tokens, stream, [recons])[0]


@torch.no_grad()
def spliced_metrics_each(
    transformer: Transformer,
    tokens: Int[Tensor, "batch pos"],
    stream: ResidualStream,
    recons: Sequence[Float[Tensor, "layer batch pos d_model"]],
) -> list[dict[str, Float[Tensor, " layer"]]]:
    """`spliced_metrics` of each reconstruction of the same `stream` (of several
    autoencoders): the true logits, which depend only on the stream, are computed once for
    all of them, and each reconstruction's values are the ones it gets alone."""
    tokens = tokens.to(transformer.device)
    mask = stream.mask
    true_stack, pred_stacks, clean_logits = stream.zeroed(), list(recons), None
    if mask is not None:
        pred_stacks = [torch.where(mask[None, :, :, None], each, stream.raw) for each in recons]
    if mask is not None or stream.special is None:
        # Splicing the unmodified stream gives the model's own logits at every layer.
        clean_logits = transformer.model(input_ids=tokens, use_cache=False).logits
    names = ("loss_true", "loss_pred", "mse", "kl")
    values: list[dict[str, list[Tensor]]] = [{k: [] for k in names} for _ in pred_stacks]
    n_counted = stream.n_counted().to(tokens.device)
    for position in range(transformer.n_layers):
        if clean_logits is None:
            logits_true = transformer.forward_at_layer(
                true_stack, position, "logits", tokens=tokens
            )
        else:
            logits_true = clean_logits
        loss_true = next_token_loss(logits_true, tokens, mask)
        for pred_stack, each in zip(pred_stacks, values, strict=True):
            logits_pred = transformer.forward_at_layer(
                pred_stack, position, "logits", tokens=tokens
            )
            each["loss_true"].append(loss_true)
            each["loss_pred"].append(next_token_loss(logits_pred, tokens, mask))
            each["mse"].append(logit_mse(logits_true, logits_pred, mask))
            each["kl"].append(logit_kldiv(logits_true, logits_pred, mask))
    results = []
    for each in values:
        result = {key: torch.stack(value) for key, value in each.items()}
        result["kl_per_token"] = result["kl"] * tokens.shape[0] / n_counted.clamp(min=1)
        results.append(result)
    return results


@torch.no_grad()
def ablated_losses(
    transformer: Transformer,
    tokens: Int[Tensor, "batch pos"],
    stream: ResidualStream,
) -> dict[str, Float[Tensor, "*layer"]]:
    """Per layer: CE loss with the stream at that layer's site replaced by zeros
    (`loss_zero`) and by its mean vector over the batch's positions that count
    (`loss_mean`), over the positions `spliced_metrics` counts; and the number of
    predictions those losses average over (`n_predictions`, a scalar).

    The ablation replaces what the reconstruction replaces in `spliced_metrics`. When every
    position counts (the original's numbers), it replaces every position, and the mean is
    over the stream the autoencoder saw (special positions zeroed, if they are skipped);
    otherwise it replaces the positions that count, the others keeping the model's own.
    """
    tokens = tokens.to(transformer.device)
    mask = stream.mask
    kept = stream.zeroed() if mask is None else stream.raw
    # forward_at_layer reads only the layer it splices at: one buffer serves every layer.
    ablated = torch.empty_like(kept)
    losses: dict[str, list[Tensor]] = {"loss_zero": [], "loss_mean": []}
    for position in range(transformer.n_layers):
        layer = kept[position]
        counted = layer if mask is None else layer[mask]
        mean = counted.float().reshape(-1, layer.shape[-1]).mean(dim=0).to(layer.dtype)
        for name, value in (("loss_zero", torch.zeros_like(mean)), ("loss_mean", mean)):
            ablated[position] = (
                value if mask is None else torch.where(mask[..., None], value, layer)
            )
            logits = transformer.forward_at_layer(ablated, position, "logits", tokens=tokens)
            losses[name].append(next_token_loss(logits, tokens, mask))
    result = {name: torch.stack(values) for name, values in losses.items()}
    result["n_predictions"] = count_predictions(tokens, mask)
    return result
