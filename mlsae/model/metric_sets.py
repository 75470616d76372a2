"""The metrics an `MLSAETransformer` logs, under the original's names."""

from torch import Tensor
from torchmetrics import MetricCollection

from mlsae.metrics import (
    DeadLatents,
    LayerwiseDenseLatents,
    LayerwiseExplainedVariance,
    LayerwiseExplainedVarianceLegacy,
    LayerwiseFVU,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseLogitKLDiv,
    LayerwiseLogitKLDivPerToken,
    LayerwiseLogitMSE,
    LayerwiseLossDelta,
    LayerwiseLossRecovered,
    LayerwiseMSE,
    LayerwiseNeverFired,
    LayerwiseWrapper,
)
from mlsae.metrics.l0_spread import LayerwiseL0Std
from mlsae.metrics.prefix_fvu import PrefixFVU
from mlsae.model.outputs import StandardizedOutput
from mlsae.model.variants import capped_vectors


def reconstruction_metrics(
    layers: list[int], n_latents: int, dead_tokens_threshold: int, dead_threshold: float
) -> MetricCollection:
    """`train/dead/rel`, and per layer and averaged, `train/fvu`, `train/l0`, `train/l1`
    and `train/mse` (updated with `inputs`, `recons`, `values`, `indices`, `mask`)."""
    n = len(layers)
    return MetricCollection(
        {
            "dead/rel": DeadLatents(n_latents, dead_tokens_threshold),
            "fvu": LayerwiseWrapper(LayerwiseFVU(n), layers=layers, prefix="fvu/"),
            "l0": LayerwiseWrapper(LayerwiseL0Norm(n, dead_threshold), layers=layers, prefix="l0/"),
            "l1": LayerwiseWrapper(LayerwiseL1Norm(n), layers=layers, prefix="l1/"),
            "mse": LayerwiseWrapper(LayerwiseMSE(n), layers=layers, prefix="mse/"),
        },
        prefix="train/",
    )


def selection_metrics(
    layers: list[int], dead_threshold: float, widths: tuple[int, ...] = ()
) -> MetricCollection:
    """Beside `reconstruction_metrics`, for every architecture: `train/l0/std` per layer and
    averaged (updated with `values`, `mask`); for Matryoshka (`widths`), also
    `train/fvu/prefix_<w>` for each prefix, averaged over layers (updated with `inputs`,
    `prefix_recons`, `mask`)."""
    n = len(layers)
    metrics = {
        "l0/std": LayerwiseWrapper(
            LayerwiseL0Std(n, dead_threshold), layers=layers, prefix="l0/std/"
        )
    }
    if widths:
        metrics["fvu/prefix"] = PrefixFVU(n, widths)
    return MetricCollection(metrics, prefix="train/", compute_groups=False)


def log_selection(
    metrics: MetricCollection,
    batchtopk: bool,
    n_latents: int,
    inputs: Tensor,
    result: StandardizedOutput,
    mask: Tensor | None,
) -> dict[str, Tensor]:
    """The batch values of `selection_metrics` and, for a BatchTopK selection,
    `train/batchtopk/capped`: the share of the vectors that count that kept all their
    candidates, with positive values (the capacity may have cut off more; docs/variants.md)."""
    values = result.output.topk.values
    logged = dict(
        metrics(inputs=inputs, values=values, mask=mask, prefix_recons=result.prefix_recons)
    )
    if batchtopk:
        capped, counted = capped_vectors(values, n_latents, mask)
        logged["train/batchtopk/capped"] = capped / counted.clamp_min(1)
    return logged


def spliced_metrics(layers: list[int]) -> MetricCollection:
    """Per layer and averaged, `val/logit/kldiv` (summed over a sequence's positions, the
    original's column), `val/logit/kldiv_per_token`, `val/logit/mse` and `val/loss/delta`
    (updated with `loss_true`, `loss_pred`, `logit_mse`, `logit_kldiv`,
    `logit_kldiv_per_token`)."""
    n = len(layers)
    return MetricCollection(
        {
            "logit/kldiv": LayerwiseWrapper(
                LayerwiseLogitKLDiv(n), layers=layers, prefix="logit/kldiv/"
            ),
            "logit/kldiv_per_token": LayerwiseWrapper(
                LayerwiseLogitKLDivPerToken(n), layers=layers, prefix="logit/kldiv_per_token/"
            ),
            "logit/mse": LayerwiseWrapper(LayerwiseLogitMSE(n), layers=layers, prefix="logit/mse/"),
            "loss/delta": LayerwiseWrapper(
                LayerwiseLossDelta(n), layers=layers, prefix="loss/delta/"
            ),
        },
        prefix="val/",
    )


COMPARISON_GROUPS = (
    "train/explained_variance",
    "train/explained_variance_legacy",
    "val/loss/recovered_zero",
    "val/loss/recovered_mean",
    "train/never_fired",
    "train/dense",
)
"""The columns of `comparison_metrics`, each `<group>/layer_<i>` and `<group>/avg`."""


def comparison_metrics(layers: list[int], n_inputs: int, n_latents: int) -> MetricCollection:
    """What SAELens' and SAEBench's evaluations report, per layer and averaged, over a whole
    evaluation (docs/evaluation.md): `train/explained_variance` (and `_legacy`),
    `train/never_fired`, `train/dense` (updated with `inputs`, `recons`, `values`,
    `indices`, `mask`) and `val/loss/recovered_zero` and `val/loss/recovered_mean` (updated
    with `loss_true`, `loss_pred`, `loss_zero`, `loss_mean`, `n_predictions`)."""
    n = len(layers)
    metrics = {
        "train/explained_variance": LayerwiseExplainedVariance(n, n_inputs),
        "train/explained_variance_legacy": LayerwiseExplainedVarianceLegacy(n),
        "val/loss/recovered_zero": LayerwiseLossRecovered(n, "zero"),
        "val/loss/recovered_mean": LayerwiseLossRecovered(n, "mean"),
        "train/never_fired": LayerwiseNeverFired(n, n_latents),
        "train/dense": LayerwiseDenseLatents(n, n_latents),
    }
    return MetricCollection(
        {
            name: LayerwiseWrapper(metric, layers=layers, prefix=f"{name}/")
            for name, metric in metrics.items()
        },
        compute_groups=False,
    )
