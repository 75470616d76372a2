"""Small value types shared by the autoencoder, the decoder and the analyses."""

from typing import NamedTuple

from jaxtyping import Float, Int
from torch import Tensor


class TopK(NamedTuple):
    """The selected latents of every vector: values and their latent indices."""

    values: Float[Tensor, "... k"]
    """The selected activations (before ReLU in `encode`, after it in `forward`)."""

    indices: Int[Tensor, "... k"]
    """The latent index of each selected activation."""


class Stats(NamedTuple):
    """The per-vector statistics that standardisation removed."""

    mean: Float[Tensor, "... 1"]
    """The mean over the last dimension."""

    std: Float[Tensor, "... 1"]
    """The unbiased standard deviation over the last dimension of `x - mean`."""
