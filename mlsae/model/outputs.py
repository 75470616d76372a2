"""What `MLSAE.encode`, `MLSAE.forward` and `MLSAE.forward_standardized` return (also
importable from `mlsae.model.autoencoder`)."""

from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor

from mlsae.types import Stats, TopK


class EncoderOutput(NamedTuple):
    """What `MLSAE.encode` returns."""

    topk: TopK
    """The k largest pre-activations of every vector (before ReLU) and their latents; for
    the other architectures, `capacity` entries per vector: the kept pre-activations, zeros
    where not kept (see `MLSAE.encode`)."""

    auxk: TopK | None
    """The largest pre-activations among dead latents (at most `auxk` of them; an
    empty selection when no latent is dead), or None when `auxk` is None."""

    stats: Stats | None
    """The statistics removed by standardisation, or None without it."""

    dead: Float[Tensor, ""]
    """The fraction of latents that are dead."""


class AutoencoderOutput(NamedTuple):
    """What `MLSAE.forward` returns."""

    topk: TopK
    """The k largest latents of every vector, after ReLU (the other architectures:
    `capacity` entries per vector, zeros where not kept)."""

    recons: Float[Tensor, "... n_inputs"]
    """The reconstructions, in the space of the inputs."""

    auxk: TopK | None
    """AuxK's selection among dead latents, after ReLU (None when `auxk` is None)."""

    auxk_recons: Float[Tensor, "... n_inputs"] | None
    """AuxK's model of the residual error `standardised inputs - (decode(topk) +
    pre_encoder_bias)`: `decode(auxk)` in the standardised space, with no bias."""

    dead: Float[Tensor, ""]
    """The fraction of latents that are dead."""


class StandardizedOutput(NamedTuple):
    """`MLSAE.forward` together with the standardised-space tensors AuxK needs."""

    output: AutoencoderOutput
    inputs: Float[Tensor, "... n_inputs"]
    """The encoder's inputs before the pre-encoder bias is subtracted."""

    recons: Float[Tensor, "... n_inputs"]
    """`decode(topk) + pre_encoder_bias`, before un-standardisation."""

    prefix_recons: tuple[Float[Tensor, "... n_inputs"], ...] = ()
    """Matryoshka's reconstructions from the latents of each prefix `[0, w)` in the space
    of the inputs, one per width (the last is `output.recons`); () for the others."""
