"""Where each site an SAE reads is in a decoder block, how to read it, and how to splice a
replacement in its place.

A site is the input or the output of one module of a block (the block itself for the
residual stream), so forward pre-hooks read and rewrite inputs and forward hooks read and
rewrite outputs, whatever the module returns (a tensor, or a tuple that starts with one).
The modules are named per family, by block class of transformers 5 (`SUBLAYER_SITES`):
attn_out is the attention module's output (`attention`, `attn`, `self_attn`), mlp_out the
MLP's, mlp_in the MLP's input and attn_z the input of the attention's output projection
(`attention.dense`, `attn.c_proj`, `self_attn.o_proj`), except that Gemma 2's attn_out and
mlp_out are the outputs of `post_attention_layernorm` and `post_feedforward_layernorm`.

attn_out and mlp_out are what each sub-layer adds to the residual stream (Gemma 2 normalises
both before adding them), so `resid_post = resid_pre + attn_out + mlp_out` in every family,
sequential or parallel (GPT-NeoX's `use_parallel_residual`). The residual stream sites need
no table: any block has them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from jaxtyping import Float, Int
from torch import Tensor, nn

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_in", "attn_z")
"""Where an SAE reads: the residual stream entering (`resid_pre`) or leaving
(`resid_post`) a block, the attention's output, the MLP's output, the normalised MLP input
and the concatenated head outputs entering the attention's output projection."""

INPUT, OUTPUT = True, False

_LLAMA_LIKE = {
    "attn_out": ("self_attn", OUTPUT),
    "mlp_out": ("mlp", OUTPUT),
    "mlp_in": ("mlp", INPUT),
    "attn_z": ("self_attn.o_proj", INPUT),
}

SUBLAYER_SITES: dict[str, dict[str, tuple[str, bool]]] = {
    "GPTNeoXLayer": {
        "attn_out": ("attention", OUTPUT),
        "mlp_out": ("mlp", OUTPUT),
        "mlp_in": ("mlp", INPUT),
        "attn_z": ("attention.dense", INPUT),
    },
    "GPT2Block": {
        "attn_out": ("attn", OUTPUT),
        "mlp_out": ("mlp", OUTPUT),
        "mlp_in": ("mlp", INPUT),
        "attn_z": ("attn.c_proj", INPUT),
    },
    "LlamaDecoderLayer": _LLAMA_LIKE,
    "Qwen2DecoderLayer": _LLAMA_LIKE,
    "Gemma2DecoderLayer": {
        "attn_out": ("post_attention_layernorm", OUTPUT),
        "mlp_out": ("post_feedforward_layernorm", OUTPUT),
        "mlp_in": ("mlp", INPUT),
        "attn_z": ("self_attn.o_proj", INPUT),
    },
}
"""By block class: each site other than the residual stream, as (module name in the block,
whether the site is that module's input)."""

Site = tuple[int, str]
"""A block index and a site name."""


class StopForward(Exception):
    """Raised by a hook once nothing more is needed, to skip the rest of the model."""


class SiteLocation(NamedTuple):
    module: nn.Module
    is_input: bool
    """True if the site is the module's (first) input, False if it is its output."""


def site_width(config: Any, site: str) -> int:
    """The width of the vectors at `site` of a model whose (text) config is `config`: the
    heads' concatenated width for attn_z, the model's width elsewhere."""
    check_known_site(site)
    if site != "attn_z":
        return config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


Replacement = Float[Tensor, "batch pos width"] | Callable[[Tensor], Tensor]
"""What replaces a site's activations: a tensor, or a function of the activations the model
computes there (for a replacement that keeps some of them)."""


def check_known_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")


def find_site(model: nn.Module, block: nn.Module, site: str) -> SiteLocation:
    """The module of `block` whose input or output is `site` (`model` names the family in
    errors)."""
    check_known_site(site)
    if site in ("resid_pre", "resid_post"):
        return SiteLocation(block, site == "resid_pre")
    block_class = type(block).__name__
    if block_class not in SUBLAYER_SITES:
        raise ValueError(
            f"{type(model).__name__} has no known {site} site: mlsae finds sites other than "
            f"resid_pre and resid_post only in blocks of class {', '.join(SUBLAYER_SITES)}, "
            f"not {block_class}."
        )
    name, is_input = SUBLAYER_SITES[block_class][site]
    return SiteLocation(block.get_submodule(name), is_input)


def read_sites(
    model: nn.Module, blocks: nn.ModuleList, tokens: Int[Tensor, "batch pos"], wanted: list[Site]
) -> dict[Site, Float[Tensor, "batch pos width"]]:
    """The activations at each `(block index, site)` of `wanted`, for the `tokens`.

    The model stops as soon as it has computed the last of them.
    """
    needed = set(wanted)
    if not needed:
        raise ValueError("wanted must name at least one (layer, site).")
    captured: dict[Site, Tensor] = {}

    def capture(key: Site, tensor: Tensor) -> None:
        captured[key] = tensor
        if len(captured) == len(needed):
            raise StopForward

    with contextlib.ExitStack() as hooks:
        for layer, site in needed:
            location = find_site(model, _block(blocks, layer), site)
            hooks.enter_context(_hooked(location, _reader(capture, (layer, site))))
        try:
            model(input_ids=tokens, use_cache=False)
        except StopForward:
            pass
    if len(captured) != len(needed):
        missing = sorted(needed - captured.keys())
        raise RuntimeError(f"{type(model).__name__} never computed the sites {missing}.")
    return captured


def splice_site(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    site: str,
    replacement: Replacement,
) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits of the model on `tokens` with the activations at `site` of block `layer`
    replaced by `replacement` (of the same shape, or a function of what the model computes
    there); the rest of the model runs as usual."""
    with site_replaced(model, blocks, layer, site, replacement):
        return model(input_ids=tokens, use_cache=False).logits


@contextlib.contextmanager
def site_replaced(
    model: nn.Module,
    blocks: nn.ModuleList,
    layer: int,
    site: str,
    replacement: Replacement,
) -> Iterator[None]:
    """While active, every forward pass of `model` sees `replacement` at `site` of block
    `layer` instead of what it computes there (a function: `replacement(computed)`)."""
    location = find_site(model, _block(blocks, layer), site)

    def replace(original: Tensor) -> Tensor:
        replaced = replacement(original) if callable(replacement) else replacement
        if original.shape != replaced.shape:
            raise ValueError(
                f"the replacement at {site} of block {layer} has shape "
                f"{tuple(replaced.shape)}, but the model computes {tuple(original.shape)}."
            )
        return replaced.to(original.device, original.dtype)

    with _hooked(location, replace):
        yield


def _block(blocks: nn.ModuleList, layer: int) -> nn.Module:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be a block index in [0, {len(blocks)}), not {layer!r}.")
    return blocks[layer]


def _reader(capture: Callable[[Site, Tensor], None], key: Site) -> Callable[[Tensor], Tensor]:
    def read(tensor: Tensor) -> Tensor:
        capture(key, tensor)
        return tensor

    return read


@contextlib.contextmanager
def _hooked(location: SiteLocation, rewrite: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, the tensor at `location` goes through `rewrite` (tensor -> tensor)."""
    if location.is_input:

        def rewrite_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (rewrite(args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": rewrite(kwargs["hidden_states"])}
            raise TypeError(f"{type(module).__name__} was called without a positional input.")

        handle = location.module.register_forward_pre_hook(rewrite_input, with_kwargs=True)
    else:

        def rewrite_output(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, Tensor):
                return rewrite(output)
            if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
                return (rewrite(output[0]), *output[1:])
            raise TypeError(
                f"{type(module).__name__} returned a {type(output).__name__}, not a tensor "
                "or a tuple that starts with one."
            )

        handle = location.module.register_forward_hook(rewrite_output)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def skip_blocks_up_to(
    blocks: nn.ModuleList, index: int, replacement: Tensor, returns_tuple: bool
) -> Iterator[None]:
    """Blocks before `index` pass their input through; block `index` returns `replacement`.

    Their `forward` is overridden on the instance (not the class), so the blocks keep
    their attributes (layer index, attention type) and their hooks still run.
    """

    def pass_through(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if returns_tuple else hidden

    def replace(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        replaced = replacement.to(hidden.device, hidden.dtype)
        return (replaced,) if returns_tuple else replaced

    overridden = list(blocks[: index + 1])
    previous = [block.__dict__.get("forward") for block in overridden]
    try:
        for block in overridden[:-1]:
            block.forward = pass_through
        overridden[-1].forward = replace
        yield
    finally:
        for block, forward in zip(overridden, previous, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
