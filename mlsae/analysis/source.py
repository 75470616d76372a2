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

from mlsae.cli import ConfigError
from mlsae.lm.architecture import text_config
from mlsae.lm.sites import site_width
from mlsae.lm.transformer import Transformer
from mlsae.lm.transformer_lens import LensMap, lens_map
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.types import TopK
from mlsae.saes.base import SAE, SparseLatents
from mlsae.saes.stack import SAEStack, load_sae_stack
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
        check_stack_fits(transformer, stack)
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
        self.lens_maps = [
            activation_map(transformer, sae, name)
            for sae, name in zip(stack, stack.names, strict=True)
        ]
        """Each SAE's map from the transformer's activations at its site to those it was
        trained on (the identity but for SAEs trained on TransformerLens' activations)."""

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
        """The activations each SAE reads, in the stack's order (one forward pass), as it
        was trained on them (`lens_maps`)."""
        wanted = list(zip(self.layers, self.sites, strict=True))
        read = self.transformer.read_sites(tokens.to(self.device), wanted)
        pairs = zip(wanted, self.stack, self.lens_maps, strict=True)
        return [lens.to_lens(read[key]).to(parameter_dtype(sae)) for key, sae, lens in pairs]

    @torch.no_grad()
    def logits_with_replaced(
        self,
        tokens: Int[Tensor, "batch pos"],
        position: int,
        replacement: Float[Tensor, "batch pos width"],
        where: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos vocab"]:
        """The logits with the site of the `position`-th SAE replaced by `replacement`, in
        the terms that SAE reads (`read`), at the positions `where` (None: all), the others
        keeping the model's own activations exactly."""
        lens = self.lens_maps[position]

        def replace(computed: Tensor) -> Tensor:
            replaced = lens.to_model(replacement.to(computed.device), computed)
            replaced = replaced.to(computed.dtype)
            return replaced if where is None else torch.where(where[..., None], replaced, computed)

        layer, site = self.layers[position], self.sites[position]
        return self.transformer.logits_with_site_replaced(
            tokens.to(self.device), layer, site, replace
        )

    @torch.no_grad()
    def latents(self, tokens: Int[Tensor, "batch pos"]) -> LatentBatch:
        tokens = tokens.to(self.device)
        inputs = zip(self.stack, self.read(tokens), strict=True)
        sparse = [sae.encode_sparse(x) for sae, x in inputs]
        topk, selected = padded_latents(sparse)
        return LatentBatch(topk, self.mask(tokens), selected)


def parameter_dtype(sae: SAE) -> torch.dtype:
    """The dtype of an SAE's weights, which its inputs are cast to."""
    return next(sae.parameters(), torch.empty(0)).dtype


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


def activation_map(transformer: Transformer, sae: SAE, name: str) -> LensMap:
    """The map from `transformer`'s activations at `sae`'s site to those `sae` was trained
    on; a `ConfigError` where TransformerLens' processing cannot be mapped there."""
    try:
        return lens_map(transformer, sae.layer, sae.site, sae.activation_source)
    except ValueError as error:
        raise ConfigError(f"{name} was trained on TransformerLens' activations: {error}") from None


def check_stack_fits(transformer: Transformer, stack: SAEStack) -> None:
    """A `ConfigError` for an SAE of `stack` that reads a block the transformer does not
    have, or vectors of another width than its site's."""
    config = text_config(transformer.config)
    for sae, name in zip(stack, stack.names, strict=True):
        if not 0 <= sae.layer < transformer.n_blocks:
            raise ConfigError(
                f"{name} reads block {sae.layer}, but {transformer.model_name} has "
                f"{transformer.n_blocks} blocks (0 to {transformer.n_blocks - 1})"
            )
        width = site_width(config, sae.site)
        if sae.d_in != width:
            raise ConfigError(
                f"{name} encodes vectors of width {sae.d_in}, but {sae.site} of block "
                f"{sae.layer} of {transformer.model_name} has width {width}: is it an SAE "
                "of this model?"
            )


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
