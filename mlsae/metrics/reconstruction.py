"""How well an autoencoder reconstructs its inputs, as tensor formulas.

Inputs are laid out `[layer, batch, pos, n_inputs]`. `mask` (`[batch, pos]`, True =
counts) excludes positions such as special tokens; without it every position counts, as in
the original.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.metrics.masking import position_weights


def layerwise_mse_and_var(
    inputs: Float[Tensor, "layer batch pos n_inputs"],
    recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer: the mean squared error over the layer's elements and the unbiased
    variance of its inputs, over the positions that count."""
    if mask is None:
        mse = (recons - inputs).pow(2).mean(dim=(1, 2, 3))
        return mse, inputs.var(dim=(1, 2, 3))
    weights = position_weights(mask, inputs)
    n_elements = weights.sum() * inputs.shape[-1]
    mse = ((recons - inputs).pow(2) * weights).sum(dim=(1, 2, 3)) / n_elements
    mean = (inputs * weights).sum(dim=(1, 2, 3), keepdim=True) / n_elements
    var = ((inputs - mean).pow(2) * weights).sum(dim=(1, 2, 3)) / (n_elements - 1)
    return mse, var


def auxk_loss(
    error: Float[Tensor, "layer batch pos n_inputs"],
    auxk_recons: Float[Tensor, "layer batch pos n_inputs"],
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""]:
    """The AuxK loss (Gao et al., 2024): how well the dead latents' reconstruction
    `auxk_recons` models the main reconstruction's residual `error`, normalised per layer
    by that error's variance over the positions that count, then averaged over layers.

    Both are in the same space (the autoencoder's standardised one, in training). `error`
    is detached, so the loss trains only what made `auxk_recons`. A layer whose error has
    no variance contributes 0.
    """
    error = error.detach()
    weights = position_weights(mask, error)
    n_vectors = weights.sum(dim=(1, 2, 3), keepdim=True)
    mean_error = (error * weights).sum(dim=(1, 2), keepdim=True) / n_vectors
    squared_error = ((auxk_recons - error).pow(2) * weights).sum(dim=(1, 2, 3))
    variance = ((error - mean_error).pow(2) * weights).sum(dim=(1, 2, 3))
    return torch.nan_to_num(squared_error / variance, nan=0.0, posinf=0.0).mean()
