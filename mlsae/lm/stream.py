"""The residual stream as an SAE sees it: the block outputs of a batch, which positions
count, and the inputs after zeroing special tokens and the tuned lens."""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mlsae.lm.transformer import Transformer


class ResidualStream(NamedTuple):
    """One batch of the transformer's residual stream, as the autoencoder sees it."""

    raw: Float[Tensor, "layer batch pos d_model"]
    """The block outputs, unmasked, in the transformer's space."""

    inputs: Float[Tensor, "layer batch pos d_model"]
    """What the autoencoder encodes: special positions zeroed (with
    `skip_special_tokens`), translated by the tuned lens (with a lens)."""

    mask: Bool[Tensor, "batch pos"] | None
    """The positions that count in losses and metrics (None: all of them)."""

    special: Bool[Tensor, "batch pos"] | None
    """The zeroed special-token positions (None without `skip_special_tokens`)."""

    def zeroed(self) -> Float[Tensor, "layer batch pos d_model"]:
        """The block outputs with the special-token positions zeroed, if any."""
        if self.special is None:
            return self.raw
        return self.raw.masked_fill(self.special[None, :, :, None], 0.0)

    def n_counted(self) -> Int[Tensor, ""]:
        """The number of `[batch, pos]` positions that count."""
        if self.mask is None:
            return torch.tensor(self.inputs.shape[1] * self.inputs.shape[2], device=self.raw.device)
        return self.mask.sum()


def read_residual_stream(
    transformer: Transformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    skip_special_tokens: bool,
    count_special_tokens: bool,
    lens: nn.Module | None = None,
) -> ResidualStream:
    """The block outputs for `tokens` at the transformer's layers. With
    `skip_special_tokens`, BOS/EOS/PAD positions are zeroed in `inputs` and, unless
    `count_special_tokens` (the original's numbers), left out of `mask`; a tuned `lens`
    translates `inputs` (`lens(x, layers)`)."""
    raw = transformer.residual_stream(tokens)
    special = mask = None
    if skip_special_tokens:
        special = transformer.special_token_mask(tokens.to(raw.device))
        if not count_special_tokens:
            mask = ~special
    stream = ResidualStream(raw, raw, mask, special)
    inputs = stream.zeroed()
    if lens is not None:
        inputs = lens(inputs, transformer.layers)
    return stream._replace(inputs=inputs)
