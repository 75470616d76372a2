"""The one inference interface of every SAE family: `encode`, `decode`, `forward`, a
sparse form of the latents, and where in the transformer it reads (`layer`, `site`).

Inputs are raw activations of the site, of any leading shape: each family's input
normalisation and bias handling happen inside `encode` and are undone by `decode`.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mlsae.lm.sites import SITES
from mlsae.lm.transformer_lens import TransformerLensOptions

SPARSE_CHUNK = 4096
"""Vectors encoded at a time by `encode_sparse`, so that the dense latents of a long input
never exist at once."""


class SparseLatents(NamedTuple):
    """The non-zero latents of every vector, row by row (a variable count per vector)."""

    values: Float[Tensor, " nnz"]
    """The non-zero activations, ordered by vector, then by latent."""

    indices: Int[Tensor, " nnz"]
    """The latent of each activation."""

    offsets: Int[Tensor, " n_vectors_plus_1"]
    """Vector v's activations are `values[offsets[v]:offsets[v + 1]]`."""

    shape: tuple[int, ...]
    """The leading shape of the input, then `d_sae`."""

    def to_dense(self) -> Float[Tensor, "... d_sae"]:
        """The dense activations, zeros where a latent is inactive."""
        n_vectors = self.offsets.numel() - 1
        rows = torch.repeat_interleave(
            torch.arange(n_vectors, device=self.values.device), self.offsets.diff()
        )
        dense = self.values.new_zeros(n_vectors, self.shape[-1])
        dense[rows, self.indices] = self.values
        return dense.reshape(self.shape)


def check_site(site: str | None, what: str) -> str | None:
    """`site` when it is None or one of `SITES`; else a ValueError naming `what`."""
    if site is not None and site not in SITES:
        raise ValueError(f"{what}: unknown site {site!r}; expected one of {', '.join(SITES)}")
    return site


class SAE(nn.Module, ABC):
    """A sparse autoencoder (or transcoder) read from one site of one layer."""

    format: str = ""
    """The name under which `load_sae` knows the family's files."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        layer: int | None = None,
        site: str | None = None,
        output_site: str | None = None,
    ) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_sae = d_sae
        self.layer = layer
        self.site = check_site(site, "site")
        self.output_site = check_site(output_site, "output_site")
        """Where a transcoder's prediction belongs; None for an autoencoder."""
        self.activation_source: TransformerLensOptions | None = None
        """How TransformerLens processed the weights of the model whose activations the SAE
        was trained on (`mlsae.lm.transformer_lens`), or None for the Hugging Face model's
        own activations."""

    @property
    def is_transcoder(self) -> bool:
        return self.output_site is not None and self.output_site != self.site

    @abstractmethod
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The latent activations of raw inputs, after the family's activation function
        (zeros where a latent is inactive)."""

    @abstractmethod
    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction (a transcoder: its prediction, without the skip connection)
        of latent activations, in the space of the raw activations."""

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction of `x` (a transcoder: its prediction of the output site)."""
        return self.decode(self.encode(x))

    def encode_sparse(self, x: Float[Tensor, "... d_in"]) -> SparseLatents:
        """`encode(x)` as its non-zero entries, computed `SPARSE_CHUNK` vectors at a time."""
        self.check_width(x)
        flat = x.reshape(-1, self.d_in)
        values, indices, counts = [], [], []
        for chunk in flat.split(SPARSE_CHUNK):
            acts = self.encode(chunk)
            rows, latents = acts.nonzero(as_tuple=True)
            values.append(acts[rows, latents])
            indices.append(latents)
            counts.append(torch.bincount(rows, minlength=chunk.shape[0]))
        counts_all = torch.cat(counts) if counts else flat.new_zeros(0, dtype=torch.long)
        offsets = torch.cat([counts_all.new_zeros(1), counts_all.cumsum(0)])
        empty = flat.new_zeros(0)
        return SparseLatents(
            torch.cat(values) if values else empty,
            torch.cat(indices) if indices else empty.long(),
            offsets,
            (*x.shape[:-1], self.d_sae),
        )

    def check_width(self, x: Tensor) -> None:
        """ValueError unless `x` is made of vectors of width `d_in`."""
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"this SAE encodes vectors of width {self.d_in}, not a tensor of shape "
                f"{tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        where = f"layer={self.layer}, site={self.site}"
        if self.is_transcoder:
            where += f", output_site={self.output_site}"
        if self.activation_source is not None:
            where += f", activation_source={self.activation_source}"
        return f"format={self.format!r}, d_in={self.d_in}, d_sae={self.d_sae}, {where}"
