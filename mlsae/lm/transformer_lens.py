"""TransformerLens' activations at a site of a Hugging Face model, and back.

An SAE trained on a TransformerLens `HookedTransformer` reads its activations, which differ
from the Hugging Face model's where TransformerLens processed the weights
(`load_and_process_state_dict`; `from_pretrained` folds and centres by default,
`from_pretrained_no_processing` does not):

- `center_writing_weights` centres every write to the residual stream, so `resid_pre`,
  `resid_post`, `attn_out` and `mlp_out` are the Hugging Face vectors minus their mean. It
  applies to LayerNorm models only (GPT-2, GPT-NeoX): TransformerLens skips it for RMSNorm.
- `mlp_in` is `ln2.hook_normalized`, inside the norm: an RMSNorm's (Llama, Qwen 2, Gemma 2)
  hooks the input divided by its RMS, before the gain, whether or not `fold_ln`; an unfolded
  LayerNorm's hooks its output, and `fold_ln` makes it a LayerNormPre, which has no gain and
  no bias.
- `fold_value_biases` moves the value bias out of `attn_z` (`hook_z`) into the output bias;
  with `fold_ln` the LayerNorm bias's share of it (`ln1.b @ W_V`) goes too. Grouped value
  heads' biases are repeated over the query heads of each group.
- `center_unembed` changes no site; `refactor_factored_attn_matrices` changes `attn_z` by a
  per-head change of basis, which is not mapped.

`lens_map(model, layer, site, options)` gives the map of one site: `to_lens(hf)` is what
TransformerLens computes from the same input, `to_model(lens, hf)` the Hugging Face
activations to splice in its place, where what centring removed (the mean) comes from the
original `hf`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mlsae.lm.architecture import find_decoder_blocks, text_config
from mlsae.lm.sites import check_known_site
from mlsae.lm.transformer import Transformer

WRITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
"""The sites that `center_writing_weights` centres."""


class TransformerLensOptions(NamedTuple):
    """How TransformerLens processed the weights of a `HookedTransformer`; the defaults are
    `HookedTransformer.from_pretrained`'s."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False

    @classmethod
    def of(cls, kwargs: Mapping[str, Any] | None, processed: bool = True) -> TransformerLensOptions:
        """The options of `from_pretrained(**kwargs)`, or with `processed=False` of
        `from_pretrained_no_processing(**kwargs)`; other keyword arguments are ignored."""
        base = FROM_PRETRAINED if processed else NO_PROCESSING
        given = {name: bool(value) for name, value in (kwargs or {}).items() if name in cls._fields}
        return base._replace(**given)


FROM_PRETRAINED = TransformerLensOptions()
"""`HookedTransformer.from_pretrained`'s options."""

NO_PROCESSING = TransformerLensOptions(False, False, False, False, False)
"""`HookedTransformer.from_pretrained_no_processing`'s options."""


class _Family(NamedTuple):
    attn_norm: str
    """The norm before the attention, in a block."""
    mlp_norm: str
    """The norm whose output is the MLP's input."""
    layer_norm: bool
    """LayerNorm (a bias, centred writes) rather than RMSNorm."""
    gain_offset: float
    """What the norm adds to its weight to get its gain (Gemma 2 stores `gain - 1`)."""
    values: Callable[[nn.Module, Tensor, int], Tensor]
    """(block, input vector, number of heads) -> the value projection of the vector, every
    head's, concatenated (for the zero vector: the value bias)."""


def _gpt2_values(block: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    return block.attn.c_attn(x[None])[0].chunk(3)[2]


def _neox_values(block: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    return block.attention.query_key_value(x).view(n_heads, 3, -1)[:, 2].flatten()


def _grouped_values(block: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    attention = block.self_attn
    values = attention.v_proj(x).view(-1, attention.head_dim)
    return values.repeat_interleave(n_heads // values.shape[0], dim=0).flatten()


_LLAMA_LIKE = _Family("input_layernorm", "post_attention_layernorm", False, 0.0, _grouped_values)

FAMILIES: dict[str, _Family] = {
    "GPT2Block": _Family("ln_1", "ln_2", True, 0.0, _gpt2_values),
    "GPTNeoXLayer": _Family("input_layernorm", "post_attention_layernorm", True, 0.0, _neox_values),
    "LlamaDecoderLayer": _LLAMA_LIKE,
    "Qwen2DecoderLayer": _LLAMA_LIKE,
    "Gemma2DecoderLayer": _Family(
        "input_layernorm", "pre_feedforward_layernorm", False, 1.0, _grouped_values
    ),
}
"""By block class: what TransformerLens' processing touches."""


@dataclass(frozen=True)
class LensMap:
    """TransformerLens' activations at one site from the Hugging Face model's:
    `lens = (hf - shift) / scale`, then centred if `centre`; and back."""

    site: str
    centre: bool = False
    shift: Tensor | None = None
    scale: Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return not self.centre and self.shift is None and self.scale is None

    def to_lens(self, hf: Float[Tensor, "... width"]) -> Float[Tensor, "... width"]:
        """What TransformerLens computes where the Hugging Face model computes `hf`."""
        lens = self._affine(hf)
        return lens - lens.mean(-1, keepdim=True) if self.centre else lens

    def to_model(
        self, lens: Float[Tensor, "... width"], hf: Float[Tensor, "... width"] | None = None
    ) -> Float[Tensor, "... width"]:
        """The Hugging Face activations that give `lens` (an SAE's reconstruction, say) in
        TransformerLens' terms, with what centring removed taken from the original `hf`
        (needed only when `centre`)."""
        if self.centre:
            if hf is None:
                raise ValueError(
                    f"{self.site} is centred in TransformerLens: mapping it back needs the "
                    "original Hugging Face activations, for their mean."
                )
            lens = lens + self._affine(hf).mean(-1, keepdim=True)
        if self.scale is not None:
            lens = lens * self.scale.to(lens)
        if self.shift is not None:
            lens = lens + self.shift.to(lens)
        return lens

    def _affine(self, hf: Tensor) -> Tensor:
        if self.shift is not None:
            hf = hf - self.shift.to(hf)
        if self.scale is not None:
            hf = hf / self.scale.to(hf)
        return hf


@torch.no_grad()
def lens_map(
    model: Transformer | nn.Module,
    layer: int,
    site: str,
    options: TransformerLensOptions | Mapping[str, Any] | None = FROM_PRETRAINED,
) -> LensMap:
    """The map between the activations at `site` of block `layer` of `model` (a Hugging Face
    causal LM or a `Transformer`) and those of a `HookedTransformer` loaded from it with
    `options` (a mapping is read as `from_pretrained`'s keyword arguments). None means
    Hugging Face's own activations (`SAE.activation_source` of an SAE that read them): the
    identity."""
    check_known_site(site)
    if options is None:
        return LensMap(site)
    if not isinstance(options, TransformerLensOptions):
        options = TransformerLensOptions.of(options)
    hf = model.model if isinstance(model, Transformer) else model
    config = text_config(hf.config)
    blocks = hf.get_submodule(find_decoder_blocks(hf, config.num_hidden_layers))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be a block index in [0, {len(blocks)}), not {layer!r}.")
    block = blocks[layer]
    family = FAMILIES.get(type(block).__name__)
    if family is None:
        raise ValueError(
            f"mlsae maps TransformerLens' activations only for blocks of class "
            f"{', '.join(FAMILIES)}, not {type(block).__name__}."
        )
    if site in WRITES:
        return LensMap(site, centre=family.layer_norm and options.center_writing_weights)
    if site == "mlp_in":
        return _normalised_input(site, block, family, options)
    return _heads(site, block, family, options, config.num_attention_heads)


def _normalised_input(
    site: str, block: nn.Module, family: _Family, options: TransformerLensOptions
) -> LensMap:
    norm = block.get_submodule(family.mlp_norm)
    if family.layer_norm and not options.fold_ln:
        return LensMap(site)
    shift = _detached(norm.bias) if family.layer_norm else None
    return LensMap(site, shift=shift, scale=_detached(norm.weight) + family.gain_offset)


def _heads(
    site: str, block: nn.Module, family: _Family, options: TransformerLensOptions, n_heads: int
) -> LensMap:
    if options.refactor_factored_attn_matrices:
        raise ValueError(
            "refactor_factored_attn_matrices changes attn_z by a change of basis of each "
            "head, which mlsae does not map."
        )
    if not options.fold_value_biases:
        return LensMap(site)
    norm = block.get_submodule(family.attn_norm)
    folded = getattr(norm, "bias", None) if family.layer_norm and options.fold_ln else None
    vector = folded if folded is not None else norm.weight.new_zeros(norm.weight.shape[-1])
    shift = _detached(family.values(block, vector, n_heads))
    # Without value biases (Llama, Gemma 2 by default) there is nothing to fold.
    return LensMap(site, shift=shift) if shift.any() else LensMap(site)


def _detached(tensor: Tensor) -> Tensor:
    return tensor.detach().float().clone()
