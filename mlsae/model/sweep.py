"""Several MLSAEs trained on one forward pass of the transformer (a sweep, docs/sweeps.md).

`SweepMember` is an `MLSAETransformer` whose training micro-batches read the residual
stream from a `SharedResidualStream`: the first member to ask for a micro-batch runs the
transformer, the others read the same tensors (shared, not copied), and the stream is
dropped once every member has read it. Everything else, the SAE's step included, is
`MLSAETransformer`'s own code.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from mlsae.lm.stream import ResidualStream
from mlsae.model.lightning import MLSAETransformer


class SharedResidualStream:
    """The residual stream of the current training micro-batch, computed once for
    `readers` SAEs that step one after another on it."""

    def __init__(self, readers: int) -> None:
        self.readers = readers
        self.computed = 0
        self._key: int | None = None
        self._tokens: Tensor | None = None
        self._stream: ResidualStream | None = None
        self._left = 0

    def get(
        self, key: int, tokens: Tensor, compute: Callable[[], ResidualStream]
    ) -> ResidualStream:
        """The stream of micro-batch `key` (its `tokens`), computed by `compute` for the
        first of the readers that asks."""
        if self._stream is None or self._key != key:
            if self._left:
                raise RuntimeError(
                    f"the sweep's SAEs read different micro-batches ({self._key} and {key})"
                )
            self._stream, self._key, self._tokens = compute(), key, tokens.detach().cpu()
            self._left = self.readers
            self.computed += 1
        elif not torch.equal(self._tokens, tokens.detach().cpu()):
            raise RuntimeError(f"the sweep's SAEs read different tokens at micro-batch {key}")
        stream = self._stream
        self._left -= 1
        if not self._left:
            self._stream = self._tokens = self._key = None
        return stream


class SweepMember(MLSAETransformer):
    """An `MLSAETransformer` of a sweep: in training, its residual stream comes from the
    sweep's `shared` stream (set after construction); elsewhere it is its own."""

    shared: SharedResidualStream | None = None

    def residual_stream(self, tokens: Tensor) -> ResidualStream:
        if self.shared is None or not self.training:
            return super().residual_stream(tokens)
        own = super().residual_stream
        with torch.no_grad():
            return self.shared.get(self.micro_batches_seen, tokens, lambda: own(tokens))

    def share_transformer(self, other: MLSAETransformer) -> None:
        """Read the residual stream with `other`'s transformer (the same frozen weights),
        dropping this member's copy."""
        self.transformer = other.transformer
