"""The MLSAE's training loss: the layerwise FVU plus the AuxK loss (for Matryoshka, the sum
of the FVUs of every prefix's reconstruction: docs/variants.md).

Inputs are laid out `[layer, batch, pos, n_inputs]`. `mask` (`[batch, pos]`,
True = counts) excludes positions such as special tokens; without it every
position counts, as in the original. The tensor formulas live in
`mlsae.metrics.reconstruction`, which the metrics share.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.reconstruction import auxk_loss, layerwise_mse_and_var
from mlsae.model.autoencoder import StandardizedOutput


def layerwise_fvu(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " layer"]:
    """Per layer: the fraction of variance unexplained, mean squared error over
    the unbiased variance of the inputs."""
    mse, var = layerwise_mse_and_var(inputs, recons, mask)
    return mse / var


class LossTerms(NamedTuple):
    """The training loss and its terms."""

    total: Float[Tensor, ""]
    """`fvu + auxk_coef * auxk` (Matryoshka: `sum(prefix_fvu) + auxk_coef * auxk`)."""

    fvu: Float[Tensor, ""]
    """The FVU averaged over layers (`loss/mse` in the logs, as the original names it)."""

    auxk: Float[Tensor, ""]
    """The AuxK loss (0 without dead latents or without AuxK)."""

    prefix_fvu: tuple[Float[Tensor, ""], ...] = ()
    """Matryoshka: the FVU averaged over layers of each prefix's reconstruction (the last,
    the full width's, is `fvu`); () for the other architectures."""


def mlsae_loss(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    result: StandardizedOutput,
    mask: Bool[Tensor, "batch pos"] | None,
    auxk_coef: float | None,
) -> LossTerms:
    """The MLSAE's training loss for `result = autoencoder.forward_standardized(inputs)`:
    the mean over layers of the FVU, plus `auxk_coef` times the AuxK loss. For Matryoshka
    (`result.prefix_recons`), the FVU term is the plain sum over prefixes of that mean FVU,
    as Bussmann et al. (2025) sum their prefixes' losses."""
    output = result.output
    prefix_fvu = tuple(
        layerwise_fvu(inputs, recons, mask).mean() for recons in result.prefix_recons
    )
    fvu = prefix_fvu[-1] if prefix_fvu else layerwise_fvu(inputs, output.recons, mask).mean()
    aux = torch.zeros((), device=inputs.device)
    if output.auxk is not None and output.auxk.values.shape[-1] > 0:
        aux = auxk_loss(result.inputs - result.recons, output.auxk_recons, mask)
    reconstruction = torch.stack(prefix_fvu).sum() if prefix_fvu else fvu
    return LossTerms(reconstruction + (auxk_coef or 0.0) * aux, fvu, aux, prefix_fvu)


__all__ = ["LossTerms", "auxk_loss", "layerwise_fvu", "layerwise_mse_and_var", "mlsae_loss"]
