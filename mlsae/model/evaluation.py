"""What an `MLSAETransformer` logs for one held-out batch, from the parts that several
models reading the same activations can share (`mlsae.trainer.shared_test`): the residual
stream, the spliced metrics of its reconstruction and the ablated losses."""

from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from mlsae.lm.stream import ResidualStream
from mlsae.model.losses import mlsae_loss
from mlsae.model.outputs import StandardizedOutput

if TYPE_CHECKING:
    from mlsae.model.lightning import MLSAETransformer


def evaluation_metrics(
    model: "MLSAETransformer",
    stream: ResidualStream,
    result: StandardizedOutput,
    spliced: dict[str, Float[Tensor, " layer"]],
    ablated: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The batch values `model` logs for `stream`, its autoencoder's `result` on it and
    the `spliced` metrics of its reconstruction (`mlsae.lm.splice.spliced_metrics`); with
    the `ablated` losses (`mlsae.lm.splice.ablated_losses`, test only), the comparison
    metrics are updated too."""
    output = result.output
    logged = dict(
        model.val_metrics(
            loss_true=spliced["loss_true"],
            loss_pred=spliced["loss_pred"],
            logit_mse=spliced["mse"],
            logit_kldiv=spliced["kl"],
            logit_kldiv_per_token=spliced["kl_per_token"],
        )
    )
    # The reconstruction error is measured in the autoencoder's space.
    logged.update(
        model.train_metrics(
            inputs=stream.inputs,
            recons=output.recons,
            values=output.topk.values,
            indices=output.topk.indices,
            mask=stream.mask,
        )
    )
    logged.update(model._selection_metrics(stream, result))
    loss = mlsae_loss(stream.inputs, result, stream.mask, model.auxk_coef)
    logged.update({"loss/total": loss.total, "loss/mse": loss.fvu, "loss/auxk": loss.auxk})
    if ablated is not None:
        model.comparison_metrics.update(
            inputs=stream.inputs,
            recons=output.recons,
            values=output.topk.values,
            indices=output.topk.indices,
            mask=stream.mask,
            loss_true=spliced["loss_true"],
            loss_pred=spliced["loss_pred"],
            **ablated,
        )
    return logged
