"""The SAE that every released family is an instance of: normalise the input, subtract the
decoder bias (or not), one affine encoder, an activation function (ReLU, JumpReLU or
top-k), one affine decoder, undo the normalisation; a transcoder adds a skip connection.

Each family's loader (`mlsae.saes.formats`) turns its files into a `LinearSAE`, so that the
maths is written once, here.
"""

from typing import Any, Literal, Protocol

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mlsae.saes.base import SAE

Activation = Literal["relu", "jumprelu", "topk"]


class Normalisation(Protocol):
    """How a family scales raw activations before encoding, undone on the output."""

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        """The normalised input and what `restore` needs to undo it."""
        ...

    def restore(self, y: Tensor, state: Any) -> Tensor:
        """`y` (in the normalised space of the output) in the space of raw activations."""
        ...


class NoNormalisation:
    """Raw activations in, raw activations out."""

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        return x, None

    def restore(self, y: Tensor, state: Any) -> Tensor:
        return y

    def __repr__(self) -> str:
        return "NoNormalisation()"


class ConstantScale:
    """Inputs multiplied by `scale_in`, outputs divided by `scale_out` (the same factor
    for an autoencoder; a transcoder's two sites may have their own)."""

    def __init__(self, scale_in: float, scale_out: float | None = None) -> None:
        self.scale_in = float(scale_in)
        self.scale_out = float(scale_in if scale_out is None else scale_out)

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        return x * self.scale_in, None

    def restore(self, y: Tensor, state: Any) -> Tensor:
        return y / self.scale_out

    def __repr__(self) -> str:
        return f"ConstantScale({self.scale_in}, {self.scale_out})"


class LinearSAE(SAE):
    """`acts = activation((normalise(x) - b_dec?) @ W_enc + b_enc)`,
    `decode(acts) = restore(acts @ W_dec + b_dec)`, `forward(x) = decode(encode(x))`
    plus `x @ W_skip` for a transcoder with a skip connection.

    `topk` keeps the k largest pre-activations of each vector and applies ReLU to them;
    `jumprelu` keeps a pre-activation where it exceeds its latent's threshold (and 0).
    Per-vector normalisations keep the statistics of the last `encode` for a `decode`
    called alone, as SAELens does; `forward` passes them along itself.
    """

    def __init__(
        self,
        W_enc: Float[Tensor, "d_in d_sae"],
        b_enc: Float[Tensor, " d_sae"],
        W_dec: Float[Tensor, "d_sae d_out"],
        b_dec: Float[Tensor, " d_out"],
        activation: Activation = "relu",
        k: int | None = None,
        threshold: Float[Tensor, " d_sae"] | None = None,
        subtract_decoder_bias: bool = True,
        normalisation: Normalisation | None = None,
        W_skip: Float[Tensor, "d_in d_out"] | None = None,
        **where: Any,
    ) -> None:
        d_in, d_sae = W_enc.shape
        super().__init__(d_in, d_sae, **where)
        if activation == "topk" and (k is None or not 0 < k <= d_sae):
            raise ValueError(f"a top-k SAE needs 0 < k <= d_sae ({d_sae}), not k={k}")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("a JumpReLU SAE needs a threshold per latent")
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(b_dec)
        self.threshold = None if threshold is None else nn.Parameter(threshold)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip)
        self.activation = activation
        self.k = k
        self.subtract_decoder_bias = subtract_decoder_bias
        self.normalisation = normalisation or NoNormalisation()
        self._last_state: Any = None

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The encoder's affine map of the normalised input."""
        x, self._last_state = self.normalisation.normalise(x)
        if self.subtract_decoder_bias:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The family's activation function."""
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Float[Tensor, "... d_sae"], state: Any = None) -> Tensor:
        state = self._last_state if state is None else state
        return self.normalisation.restore(acts @ self.W_dec + self.b_dec, state)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        acts = self.encode(x)
        output = self.decode(acts, self._last_state)
        if self.W_skip is not None:
            output = output + x @ self.W_skip
        return output

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation == "topk" else ""
        return f"{super().extra_repr()}, activation={self.activation}{k}"
