"""The small interface the analyses are written against.

An analysis needs token ids in, per-layer top-k latents out, the number of layers
and latents, and the tokenizer. `LatentSource` is that interface; `MLSAESource`
implements it for a pretrained `MLSAETransformer`, and `StackSource` for a stack of
per-layer SAEs of any family (`mlsae.saes.stack`) over a transformer.
"""

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mlsae.lm.transformer import Transformer
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.types import TopK
from mlsae.saes.base import SparseLatents
from mlsae.saes.stack import SAEStack, load_sae_stack
from mlsae.saes.stack_reader import StackReader
from mlsae.utils import get_device


class LatentBatch(NamedTuple):
    """The latents of one batch of tokens."""

    topk: TopK
    """`[layer, batch, pos, k]` selected latents, values before ReLU (as published)."""

    mask: Bool[Tensor, "batch pos"] | None
    """The positions that count (None: all of them)."""

    selected: Bool[Tensor, "layer batch pos k"] | None = None
    """Which entries hold a latent (None: all of them, as in an MLSAE's top k). The SAEs
    of a stack fire a varying number of latents per vector: their entries are padded
    with value 0 and index 0, which no analysis counts as firing."""


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


class StackSource(nn.Module):
    """`LatentSource` for a stack of per-layer SAEs over a transformer.

    Each SAE reads its own site (`read_sites`, one forward pass for all of them), unmasked:
    the SAEs see what they were trained on, special tokens included; `mask` leaves the
    special tokens out of what the analyses count, unless `count_special_tokens`. Layer
    `i` of the latents is the stack's `i`-th SAE (block `layers[i]`), its values after
    the SAE's activation function, so latent `j` at one layer and latent `j` at another
    are unrelated. `n_latents` is the largest `d_sae`.
    """

    def __init__(
        self, transformer: Transformer, stack: SAEStack, count_special_tokens: bool = False
    ) -> None:
        super().__init__()
        self.reader = StackReader(transformer, stack)
        self.transformer = transformer
        self.stack = stack
        self.count_special_tokens = count_special_tokens
        self.n_layers = len(stack)
        self.n_latents = stack.n_latents
        self.layers = stack.layers
        self.sites = stack.sites
        self.tokenizer = transformer.tokenizer
        self.model_name = transformer.model_name
        self.max_length = transformer.max_length

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def mask(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"] | None:
        """The positions that count: all but the special tokens, unless they count."""
        if self.count_special_tokens:
            return None
        return ~self.transformer.special_token_mask(tokens)

    @torch.no_grad()
    def read(self, tokens: Int[Tensor, "batch pos"]) -> list[Float[Tensor, "batch pos width"]]:
        """The activations each SAE reads, in the stack's order (one forward pass), in the
        terms it was trained on (`mlsae.saes.stack_reader`)."""
        return [activations.inputs for activations in self.reader.read(tokens)]

    @torch.no_grad()
    def logits_with_replaced(
        self,
        tokens: Int[Tensor, "batch pos"],
        position: int,
        replacement: Float[Tensor, "batch pos width"],
        where: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos vocab"]:
        """`StackReader.logits_with_replaced`: the site of the `position`-th SAE replaced
        by `replacement`, in that SAE's terms, at the positions `where` (None: all)."""
        return self.reader.logits_with_replaced(tokens, position, replacement, where)

    @torch.no_grad()
    def latents(self, tokens: Int[Tensor, "batch pos"]) -> LatentBatch:
        tokens = tokens.to(self.device)
        inputs = zip(self.stack, self.read(tokens), strict=True)
        sparse = [sae.encode_sparse(x) for sae, x in inputs]
        topk, selected = padded_latents(sparse)
        return LatentBatch(topk, self.mask(tokens), selected)


def padded_latents(
    sparse: Sequence[SparseLatents],
) -> tuple[TopK, Bool[Tensor, "layer *batch k"]]:
    """The non-zero latents of each layer as one `[layer, *batch, k]` `TopK`, `k` the most
    any vector has (at least 1), padded with zeros; and which entries are latents."""
    counts = [latents.offsets.diff() for latents in sparse]
    k = max(1, *(int(count.max()) if count.numel() else 0 for count in counts))
    values, indices, selected = [], [], []
    for latents, count in zip(sparse, counts, strict=True):
        n_vectors = count.numel()
        rows = torch.repeat_interleave(torch.arange(n_vectors, device=count.device), count)
        slots = torch.arange(rows.numel(), device=count.device) - latents.offsets[rows]
        padded_values = latents.values.new_zeros(n_vectors, k)
        padded_values[rows, slots] = latents.values
        padded_indices = torch.zeros(n_vectors, k, dtype=torch.long, device=count.device)
        padded_indices[rows, slots] = latents.indices
        shape = (*latents.shape[:-1], k)
        values.append(padded_values.view(shape))
        indices.append(padded_indices.view(shape))
        selected.append((torch.arange(k, device=count.device) < count[:, None]).view(shape))
    return TopK(torch.stack(values), torch.stack(indices)), torch.stack(selected)


def load_stack_source(
    saes: Sequence[str] | str,
    model_name: str,
    layers: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    count_special_tokens: bool = False,
) -> StackSource:
    """A stack of per-layer SAEs (`mlsae.saes.load_sae_stack`'s `saes` and `layers`) over
    the transformer `model_name` (hub id or local folder), on `device`, as a
    `LatentSource`."""
    stack = load_sae_stack(saes, layers)
    device = device or get_device()
    transformer = Transformer(model_name, device=device)
    source = StackSource(transformer, stack, count_special_tokens)
    source.requires_grad_(False)
    return source.to(device).eval()
