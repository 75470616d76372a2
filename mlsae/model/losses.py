"""Training losses of the autoencoder: layerwise FVU and the AuxK loss.

Inputs are laid out `[layer, batch, pos, n_inputs]`. `mask` (`[batch, pos]`,
True = counts) excludes positions such as special tokens; without it every
position counts, as in the original.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.masking import position_weights
from mlsae.model.autoencoder import StandardizedOutput


def layerwise_mse_and_var(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer: the mean squared error over the layer's elements and the
    unbiased variance of its inputs, over the positions that count."""
    if mask is None:
        mse = (recons - inputs).pow(2).mean(dim=(1, 2, 3))
        return mse, inputs.var(dim=(1, 2, 3))
    weights = position_weights(mask, inputs)
    n_elements = weights.sum() * inputs.shape[-1]
    mse = ((recons - inputs).pow(2) * weights).sum(dim=(1, 2, 3)) / n_elements
    mean = (inputs * weights).sum(dim=(1, 2, 3), keepdim=True) / n_elements
    var = ((inputs - mean).pow(2) * weights).sum(dim=(1, 2, 3)) / (n_elements - 1)
    return mse, var


def layerwise_fvu(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " layer"]:
    """Per layer: the fraction of variance unexplained, mean squared error over
    the unbiased variance of the inputs."""
    mse, var = layerwise_mse_and_var(inputs, recons, mask)
    return mse / var


def auxk_loss(
    error: Float[Tensor, "layer batch pos n_inputs"],
    auxk_recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""]:
    """AuxK loss (Gao et al., 2024): how well the dead latents' reconstruction models
    the main reconstruction's residual error, normalised by that error's variance.

    `error` is `standardised inputs - standardised reconstruction`; it is detached
    here, so the loss trains only the dead latents and the decoder. The result is
    the mean over layers; a layer whose error has no variance contributes 0.
    """
    error = error.detach()
    weights = position_weights(mask, error)
    n_vectors = weights.sum(dim=(1, 2, 3), keepdim=True)
    mean_error = (error * weights).sum(dim=(1, 2), keepdim=True) / n_vectors
    squared_error = ((auxk_recons - error).pow(2) * weights).sum(dim=(1, 2, 3))
    variance = ((error - mean_error).pow(2) * weights).sum(dim=(1, 2, 3))
    return torch.nan_to_num(squared_error / variance, nan=0.0, posinf=0.0).mean()


class LossTerms(NamedTuple):
    """The training loss and its terms."""

    total: Float[Tensor, ""]
    """`fvu + auxk_coef * auxk`."""

    fvu: Float[Tensor, ""]
    """The FVU averaged over layers (`loss/mse` in the logs, as the original names it)."""

    auxk: Float[Tensor, ""]
    """The AuxK loss (0 without dead latents or without AuxK)."""


def mlsae_loss(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    result: StandardizedOutput,
    mask: Bool[Tensor, "batch pos"] | None,
    auxk_coef: float | None,
) -> LossTerms:
    """The MLSAE's training loss for `result = autoencoder.forward_standardized(inputs)`:
    the mean over layers of the FVU, plus `auxk_coef` times the AuxK loss."""
    output = result.output
    fvu = layerwise_fvu(inputs, output.recons, mask).mean()
    aux = torch.zeros((), device=inputs.device)
    if output.auxk is not None and output.auxk.values.shape[-1] > 0:
        aux = auxk_loss(result.inputs - result.recons, output.auxk_recons, mask)
    return LossTerms(fvu + (auxk_coef or 0.0) * aux, fvu, aux)
