"""Shared helpers of the analysis tests: the golden checkpoint and hand-made latents."""

from collections.abc import Iterator

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mlsae.analysis.source import LatentBatch, MLSAESource, load_source
from mlsae.model.types import TopK
from tests.goldens import GOLDENS

GOLDEN_MODEL = GOLDENS / "mlsae-tfm-trained"
GOLDEN_TRANSFORMER = GOLDENS / "tiny-gpt-neox-2"
CORPUS = GOLDENS / "corpus.jsonl.zst"
TOKENS_PER_BATCH = 2 * 32


def golden_source() -> MLSAESource:
    """The golden -tfm checkpoint, special tokens counted as the original did."""
    return load_source(
        str(GOLDEN_MODEL), "cpu", count_special_tokens=True, model_name=str(GOLDEN_TRANSFORMER)
    )


def golden_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(GOLDEN_TRANSFORMER))


class ScriptedSource:
    """A `LatentSource` that returns prepared latents, one batch per call, in order."""

    def __init__(self, n_layers: int, n_latents: int, batches: list[LatentBatch]) -> None:
        self.n_layers = n_layers
        self.n_latents = n_latents
        self.layers = list(range(n_layers))
        self.tokenizer = golden_tokenizer()
        self._batches: Iterator[LatentBatch] = iter(batches)

    def latents(self, tokens: Tensor) -> LatentBatch:
        return next(self._batches)


def random_latents(
    n_layers: int,
    batch: int,
    pos: int,
    n_latents: int,
    k: int,
    generator: torch.Generator,
    mask: Tensor | None = None,
) -> LatentBatch:
    """Distinct latents per vector and values that are distinct in float16 (no ties)."""
    n_vectors = n_layers * batch * pos
    indices = torch.rand(n_vectors, n_latents, generator=generator).argsort(-1)[:, :k]
    # Multiples of 2**-10 below 2 are exact in float16; a permutation makes them distinct.
    values = (torch.randperm(2048, generator=generator)[: n_vectors * k] - 256).float() / 1024
    shape = (n_layers, batch, pos, k)
    return LatentBatch(TopK(values.view(shape), indices.view(shape)), mask)
