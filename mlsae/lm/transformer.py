"""A frozen Hugging Face causal language model, seen through its residual stream.

`Transformer.forward` returns the output of each selected decoder block (the residual
stream after the block: not the embeddings, no final norm), captured with forward hooks
on the blocks, so any causal LM whose blocks sit in one `nn.ModuleList` works (GPT-NeoX,
GPT-2, Llama, Gemma 2, Qwen 2, ...). `Transformer.forward_at_layer` replaces the output of
one block and lets the model run the rest, its own final norm and head included;
`read_sites` and `logits_with_site_replaced` do the same at any site (`mlsae.lm.sites`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mlsae.lm.architecture import (
    accept_renamed_module_names,
    build_model,
    find_decoder_blocks,
    load_pretrained_tokenizer,
    save_published_module_names,
    special_token_ids,
    text_config,
    validate_layers,
)
from mlsae.lm.fingerprint import weights_fingerprint
from mlsae.lm.sites import (
    Replacement,
    StopForward,
    read_sites,
    site_width,
    skip_blocks_up_to,
    splice_site,
)

ReturnType = Literal["logits", "loss", "both"]

_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
"""Config attributes that transformers families use for their position limit."""

_UNBOUNDED_TOKENIZER = 10**9
"""Tokenizers without a real limit report a huge `model_max_length` (about 1e30)."""


class Transformer(nn.Module):
    """A frozen causal LM that returns the residual stream after each selected block.

    The HF model is at `self.model` and its tokenizer at `self.tokenizer`. The model is
    always in eval mode (`train()` leaves it there, so dropout never applies) and its
    parameters do not require gradients.
    """

    def __init__(
        self,
        model_name: str,
        max_length: int = 2048,
        batch_size: int = 1,
        skip_special_tokens: bool = True,
        layers: list[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        load_weights: bool = True,
        attn_implementation: str | None = None,
        skip_blocks_before_splice: bool = True,
        site: str = "resid_post",
    ) -> None:
        """
        Args:
            model_name: A hub id or a local directory of a causal LM and its tokenizer.
            max_length: The length of a tokenized sequence (kept for the data pipeline).
            batch_size: The number of sequences in a batch (kept for the data pipeline).
            skip_special_tokens: Whether `forward` zeroes the vectors at positions whose
                token is the tokenizer's BOS, EOS or PAD token.
            layers: The indices of the decoder blocks to read, in the order of the output
                stack. Any subset, in any order; all blocks if None.
            device: Where a loaded model goes. A given `model` stays where it is.
            dtype: The dtype of a loaded model. A given `model` keeps its own.
            model: An already-built model to use instead of loading `model_name`.
            tokenizer: An already-built tokenizer to use instead of loading `model_name`.
            load_weights: If False, build the architecture from the config of
                `model_name` with random weights (without touching the global RNG), for
                weights that a checkpoint loads into `self.model` afterwards.
            attn_implementation: Passed to transformers when it builds the model; None
                keeps the transformers default (sdpa where supported).
            skip_blocks_before_splice: In `forward_at_layer`, do not run the blocks before
                the one whose output is replaced. Turn off for an architecture whose later
                blocks read state that earlier blocks leave behind.
            site: Where `forward` reads each layer and `forward_at_layer` splices
                (`mlsae.lm.sites.SITES`); the residual stream leaving the block by default.
        """
        super().__init__()
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self.skip_special_tokens = skip_special_tokens
        self.skip_blocks_before_splice = skip_blocks_before_splice

        has_weights = model is not None or load_weights
        if model is None:
            model = build_model(model_name, load_weights, dtype, attn_implementation)
            model.to(device)
        self.model: PreTrainedModel = model
        self.model.eval()
        self.model.requires_grad_(False)
        self.fingerprint = weights_fingerprint(model) if has_weights else None
        """`weights_fingerprint` of the weights as loaded (None when built without them),
        which checkpoints record instead of a copy of the frozen weights."""
        self.tokenizer: PreTrainedTokenizerBase = (
            tokenizer if tokenizer is not None else load_pretrained_tokenizer(model_name)
        )

        self.config: PretrainedConfig = self.model.config
        config = text_config(self.config)
        # A name, not the module: as an attribute the blocks would enter the state dict twice.
        self.blocks_path = find_decoder_blocks(self.model, config.num_hidden_layers)
        self.n_blocks = len(self.blocks)
        self.d_model: int = config.hidden_size
        self.site = site
        self.width: int = site_width(config, site)
        """The width of the vectors at `site` (`d_model` but for attn_z)."""
        self.layers = validate_layers(layers, self.n_blocks)
        self.n_layers = len(self.layers)
        self.special_token_ids: list[int] = special_token_ids(self.tokenizer)

        # None until a hook has seen a block's output (transformers 4 blocks mostly return
        # a tuple `(hidden, ...)`, transformers 5 blocks a tensor).
        self._block_returns_tuple: bool | None = None

        self.register_state_dict_post_hook(save_published_module_names)
        self.register_load_state_dict_pre_hook(accept_renamed_module_names)

    @classmethod
    def from_config(cls, model_name: str, **kwargs: Any) -> Transformer:
        """Build the architecture of `model_name` with random weights (see `load_weights`)."""
        return cls(model_name, load_weights=False, **kwargs)

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's decoder blocks, all of them (index them by block, not by position)."""
        return self.model.get_submodule(self.blocks_path)

    @property
    def context_length(self) -> int | None:
        """The most tokens the model takes in one sequence: its position limit (from its
        config), else its tokenizer's, else None (no known limit)."""
        config = text_config(self.config)
        for name in _CONTEXT_ATTRIBUTES:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _UNBOUNDED_TOKENIZER:
            return limit
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> Transformer:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(
        self, tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "n_layers batch pos d_model"]:
        """The output of each selected block, stacked in the order of `self.layers`.

        With `skip_special_tokens`, the vectors at special-token positions are zero. The
        model stops after the deepest selected block.
        """
        tokens = tokens.to(self.device)
        stacked = self.residual_stream(tokens)
        if self.skip_special_tokens:
            stacked = stacked.masked_fill(self.special_token_mask(tokens)[None, :, :, None], 0.0)
        return stacked

    @torch.no_grad()
    def residual_stream(
        self, tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "n_layers batch pos d_model"]:
        """Like `forward`, but never zeroes the special-token positions."""
        if self.site != "resid_post":
            wanted = [(layer, self.site) for layer in self.layers]
            outputs = read_sites(self.model, self.blocks, tokens.to(self.device), wanted)
            return torch.stack([outputs[key] for key in wanted])
        outputs = self._block_outputs(tokens.to(self.device), self.layers)
        return torch.stack([outputs[index] for index in self.layers])

    @torch.no_grad()
    def hidden_states(
        self, tokens: Int[Tensor, "batch pos"]
    ) -> list[Float[Tensor, "batch pos d_model"]]:
        """The unmasked output of every block of the model (all of them, not only `layers`)."""
        outputs = self._block_outputs(tokens.to(self.device), list(range(self.n_blocks)))
        return [outputs[index] for index in range(self.n_blocks)]

    def _block_outputs(
        self, tokens: Int[Tensor, "batch pos"], blocks: list[int]
    ) -> dict[int, Float[Tensor, "batch pos d_model"]]:
        """The output of each block in `blocks`, by block index; the model stops after them."""
        deepest = max(blocks)
        captured: dict[int, Tensor] = {}

        def capture(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = self._hidden_of(output)
                if index == deepest:
                    raise StopForward

            return hook

        handles = [self.blocks[index].register_forward_hook(capture(index)) for index in blocks]
        try:
            self.model(input_ids=tokens, use_cache=False)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if deepest not in captured:
            raise RuntimeError(
                f"{type(self.model).__name__} did not run its decoder block {deepest}: "
                "the blocks found are not the ones its forward pass runs."
            )
        return captured

    @torch.no_grad()
    def read_sites(
        self, tokens: Int[Tensor, "batch pos"], sites: list[tuple[int, str]]
    ) -> dict[tuple[int, str], Float[Tensor, "batch pos width"]]:
        """The unmasked activations at each `(block index, site)` (`mlsae.lm.sites`)."""
        return read_sites(self.model, self.blocks, tokens.to(self.device), sites)

    @torch.no_grad()
    def logits_with_site_replaced(
        self,
        tokens: Int[Tensor, "batch pos"],
        layer: int,
        site: str,
        replacement: Replacement,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """The logits with the activations at `site` of block `layer` (a block index, not a
        position in `layers`) replaced by `replacement`, of their shape, or by
        `replacement(activations)`."""
        tokens = tokens.to(self.device)
        return splice_site(self.model, self.blocks, tokens, layer, site, replacement)

    @torch.no_grad()
    def special_token_mask(self, tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """True where the token is the tokenizer's BOS, EOS or PAD token.

        This does not depend on `skip_special_tokens`: it says which positions `forward`
        zeroes when that is set.
        """
        special_ids = torch.tensor(self.special_token_ids, dtype=tokens.dtype, device=tokens.device)
        return torch.isin(tokens, special_ids)

    @overload
    def forward_at_layer(
        self,
        inputs: Float[Tensor, "n_layers batch pos d_model"],
        start_at_layer: int,
        return_type: Literal["loss"],
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, ""]: ...

    @overload
    def forward_at_layer(
        self,
        inputs: Float[Tensor, "n_layers batch pos d_model"],
        start_at_layer: int,
        return_type: Literal["logits"],
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]: ...

    @overload
    def forward_at_layer(
        self,
        inputs: Float[Tensor, "n_layers batch pos d_model"],
        start_at_layer: int,
        return_type: Literal["both"] = "both",
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Float[Tensor, ""], Float[Tensor, "batch pos d_vocab"]]: ...

    @torch.no_grad()
    def forward_at_layer(
        self,
        inputs: Float[Tensor, "n_layers batch pos d_model"],
        start_at_layer: int,
        return_type: ReturnType = "both",
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> (
        Float[Tensor, ""]
        | Float[Tensor, "batch pos d_vocab"]
        | tuple[Float[Tensor, ""], Float[Tensor, "batch pos d_vocab"]]
    ):
        """Run the model with the output of block `layers[start_at_layer]` replaced.

        `inputs` is a stack like the output of `forward`, and `start_at_layer` a position
        in it: the residual stream after block `self.layers[start_at_layer]` becomes
        `inputs[start_at_layer]`, and the model runs the later blocks, its final norm and
        its head. The loss is the mean next-token cross-entropy over all positions
        (special ones included), so it needs `tokens`.
        """
        if return_type not in ("logits", "loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss' or 'both', not {return_type!r}")
        if return_type != "logits" and tokens is None:
            raise ValueError(f"return_type={return_type!r} needs the input tokens for the loss.")
        if inputs.ndim != 4 or inputs.shape[0] != self.n_layers:
            raise ValueError(
                f"inputs must have shape (n_layers={self.n_layers}, batch, pos, d_model), "
                f"not {tuple(inputs.shape)}."
            )
        if not 0 <= start_at_layer < self.n_layers:
            raise ValueError(
                f"start_at_layer is a position in the stack of {self.n_layers} layers, "
                f"so it must be in [0, {self.n_layers}), not {start_at_layer}."
            )
        batch, pos = inputs.shape[1:3]
        if tokens is None and self.site != "resid_post":
            raise ValueError(f"splicing at {self.site} needs the input tokens.")
        if tokens is None:
            # The replaced block overwrites whatever these tokens would give.
            tokens = torch.zeros(batch, pos, dtype=torch.long, device=self.device)
        elif tuple(tokens.shape) != (batch, pos):
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)}, but inputs have (batch, pos) = "
                f"{(batch, pos)}."
            )
        tokens = tokens.to(self.device)

        layer, replacement = self.layers[start_at_layer], inputs[start_at_layer]
        if self.site != "resid_post":
            logits: Tensor = splice_site(
                self.model, self.blocks, tokens, layer, self.site, replacement
            )
        else:
            with self._replace_block_output(layer, replacement):
                logits = self.model(input_ids=tokens, use_cache=False).logits
        if return_type == "logits":
            return logits

        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device)
        )
        if return_type == "loss":
            return loss
        return loss, logits

    @contextlib.contextmanager
    def _replace_block_output(self, index: int, replacement: Tensor) -> Iterator[None]:
        """While active, block `index` outputs `replacement` instead of what it computes."""
        if self.skip_blocks_before_splice and self._block_returns_tuple is not None:
            with skip_blocks_up_to(self.blocks, index, replacement, self._block_returns_tuple):
                yield
            return

        def replace(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = self._hidden_of(output)
            return self._with_hidden(output, replacement.to(hidden.device, hidden.dtype))

        handle = self.blocks[index].register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def _hidden_of(self, output: Any) -> Tensor:
        """The hidden states in a block's output, which is a tensor or a tuple."""
        if isinstance(output, Tensor):
            self._block_returns_tuple = False
            return output
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            self._block_returns_tuple = True
            return output[0]
        raise TypeError(
            f"Expected a decoder block to return a tensor or a tuple that starts with one, "
            f"not {type(output).__name__}."
        )

    @staticmethod
    def _with_hidden(output: Any, hidden: Tensor) -> Any:
        return hidden if isinstance(output, Tensor) else (hidden, *output[1:])
