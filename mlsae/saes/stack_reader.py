"""A stack of per-layer SAEs over the transformer they read: what each SAE reads and what it
reconstructs, in the terms it was trained on, and its reconstruction spliced back in.

Each SAE reads its site unmasked (special tokens included, as it was trained). Where an SAE
was trained on TransformerLens' activations (`SAE.activation_source`), its sites are mapped
from the Hugging Face model's (`mlsae.lm.transformer_lens`) and back before splicing.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.cli import ConfigError
from mlsae.lm.architecture import text_config
from mlsae.lm.sites import site_width
from mlsae.lm.transformer import Transformer
from mlsae.lm.transformer_lens import LensMap, lens_map
from mlsae.saes.base import SAE
from mlsae.saes.stack import SAEStack


class SAEActivations(NamedTuple):
    """The activations around one SAE of a stack, for one batch, in the SAE's terms."""

    inputs: Float[Tensor, "batch pos width"]
    """What the SAE reads."""

    targets: Float[Tensor, "batch pos width"]
    """What it reconstructs: its inputs, but a transcoder's output site."""


def written_site(sae: SAE) -> str:
    """The site whose activations the SAE reconstructs: a transcoder's output site."""
    assert sae.site is not None
    return sae.output_site if sae.is_transcoder and sae.output_site else sae.site


class StackReader:
    """The SAEs of `stack` over `transformer`; a `ConfigError` for an SAE that does not fit
    it (a block it lacks, another width, a TransformerLens processing that is not mapped)."""

    def __init__(self, transformer: Transformer, stack: SAEStack) -> None:
        check_stack_fits(transformer, stack)
        self.transformer = transformer
        self.stack = stack
        self.input_maps = [
            activation_map(transformer, sae, sae.site, name)
            for sae, name in zip(stack, stack.names, strict=True)
        ]
        """Each SAE's map from the model's activations at the site it reads to its own."""
        self.target_maps = [
            activation_map(transformer, sae, written_site(sae), name)
            for sae, name in zip(stack, stack.names, strict=True)
        ]

    def parameter_dtype(self, position: int) -> torch.dtype:
        """The dtype of the weights of the `position`-th SAE, which its inputs are cast to."""
        return next(self.stack[position].parameters(), torch.empty(0)).dtype

    @torch.no_grad()
    def read(self, tokens: Int[Tensor, "batch pos"], targets: bool = False) -> list[SAEActivations]:
        """Each SAE's inputs (and with `targets`, what it reconstructs; else its inputs
        again), in the stack's order, from one forward pass."""
        wanted = [(sae.layer, sae.site) for sae in self.stack]
        if targets:
            wanted += [(sae.layer, written_site(sae)) for sae in self.stack]
        read = self.transformer.read_sites(tokens.to(self.transformer.device), wanted)
        result = []
        for position, sae in enumerate(self.stack):
            dtype = self.parameter_dtype(position)
            inputs = self.input_maps[position].to_lens(read[(sae.layer, sae.site)]).to(dtype)
            target = inputs
            if targets and sae.is_transcoder:
                raw = read[(sae.layer, written_site(sae))]
                target = self.target_maps[position].to_lens(raw).to(dtype)
            result.append(SAEActivations(inputs, target))
        return result

    @torch.no_grad()
    def logits_with_replaced(
        self,
        tokens: Int[Tensor, "batch pos"],
        position: int,
        replacement: Float[Tensor, "batch pos width"],
        where: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos vocab"]:
        """The logits with the site the `position`-th SAE reconstructs replaced by
        `replacement`, in that SAE's terms, at the positions `where` (None: all); the
        others keep the model's own activations exactly."""
        lens = self.target_maps[position]

        def replace(computed: Tensor) -> Tensor:
            replaced = lens.to_model(replacement.to(computed.device), computed)
            replaced = replaced.to(computed.dtype)
            return replaced if where is None else torch.where(where[..., None], replaced, computed)

        sae = self.stack[position]
        assert sae.layer is not None
        tokens = tokens.to(self.transformer.device)
        return self.transformer.logits_with_site_replaced(
            tokens, sae.layer, written_site(sae), replace
        )


def activation_map(transformer: Transformer, sae: SAE, site: str, name: str) -> LensMap:
    """The map from `transformer`'s activations at `site` of `sae`'s block to those `sae`
    was trained on; a `ConfigError` where TransformerLens' processing cannot be mapped."""
    try:
        return lens_map(transformer, sae.layer, site, sae.activation_source)
    except ValueError as error:
        raise ConfigError(f"{name} was trained on TransformerLens' activations: {error}") from None


def check_stack_fits(transformer: Transformer, stack: SAEStack) -> None:
    """A `ConfigError` for an SAE of `stack` that reads a block the transformer does not
    have, or vectors of another width than its site's."""
    config = text_config(transformer.config)
    for sae, name in zip(stack, stack.names, strict=True):
        if sae.layer is None or not 0 <= sae.layer < transformer.n_blocks:
            raise ConfigError(
                f"{name} reads block {sae.layer}, but {transformer.model_name} has "
                f"{transformer.n_blocks} blocks (0 to {transformer.n_blocks - 1})"
            )
        assert sae.site is not None
        width = site_width(config, sae.site)
        if sae.d_in != width:
            raise ConfigError(
                f"{name} encodes vectors of width {sae.d_in}, but {sae.site} of block "
                f"{sae.layer} of {transformer.model_name} has width {width}: is it an SAE "
                "of this model?"
            )
