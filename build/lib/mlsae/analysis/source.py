"""The small interface the analyses are written against.

An analysis needs token ids in, per-layer top-k latents out, the number of layers
and latents, and the tokenizer. `LatentSource` is that interface; `MLSAESource`
implements it for a pretrained `MLSAETransformer`, so other SAE families can be
plugged in with an adapter of their own.
"""

from typing import NamedTuple, Protocol

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mlsae.model.lightning import MLSAETransformer
from mlsae.model.types import TopK
from mlsae.utils import get_device


class LatentBatch(NamedTuple):
    """The latents of one batch of tokens."""

    topk: TopK
    """`[layer, batch, pos, k]` selected latents, values before ReLU (as published)."""

    mask: Bool[Tensor, "batch pos"] | None
    """The positions that count (None: all of them)."""


class LatentSource(Protocol):
    """What an analysis needs from a sparse autoencoder over a transformer's layers."""

    n_layers: int
    n_latents: int
    layers: list[int]
    tokenizer: PreTrainedTokenizerBase

    def latents(self, tokens: Int[Tensor, "batch pos"]) -> LatentBatch: ...


class MLSAESource:
    """`LatentSource` for an `MLSAETransformer` (tuned lens applied when it has one)."""

    def __init__(self, model: MLSAETransformer) -> None:
        self.model = model
        self.n_layers = model.n_layers
        self.n_latents = model.n_latents
        self.layers = list(model.layers)
        self.tokenizer = model.transformer.tokenizer

    @torch.no_grad()
    def latents(self, tokens: Int[Tensor, "batch pos"]) -> LatentBatch:
        stream = self.model.residual_stream(tokens.to(self.model.device))
        return LatentBatch(self.model.autoencoder.encode(stream.inputs).topk, stream.mask)


def load_source(
    repo_id: str,
    device: torch.device | str | None = None,
    count_special_tokens: bool = False,
    model_name: str | None = None,
) -> MLSAESource:
    """A pretrained `-tfm` model (hub id or local folder) as a `LatentSource`.

    `count_special_tokens` includes the zeroed special-token positions, as the original
    analyses did; `model_name` overrides where the transformer's config and tokenizer
    come from.
    """
    overrides = {"count_special_tokens": count_special_tokens}
    if model_name is not None:
        overrides["model_name"] = model_name
    model = MLSAETransformer.from_pretrained(repo_id, **overrides)
    model.requires_grad_(False)
    model.to(device or get_device())
    return MLSAESource(model)
