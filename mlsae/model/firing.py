"""Which latents fired during one optimizer step, for the dead-latent state, and the step's
BatchTopK minimum, for the threshold."""

from collections.abc import Callable

import torch
from jaxtyping import Int
from torch import Tensor


class StepFiring:
    """The firing counts and token counts of the micro-batches of one optimizer step,
    applied to the autoencoder's dead-latent state once, when the step ends."""

    def __init__(self) -> None:
        self.fired: Tensor | None = None
        self.tokens: Tensor | None = None

    def add(self, fired: Int[Tensor, " n_latents"], tokens: Int[Tensor, ""]) -> None:
        """One micro-batch's counts (`MLSAE.fired_counts`, the positions that count)."""
        self.fired = fired if self.fired is None else self.fired + fired
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def apply(self, autoencoder, skip: Tensor, reduce: Callable[[Tensor], Tensor]) -> None:
        """Advance `autoencoder.update_dead_latents` by the step's counts, summed over
        ranks by `reduce`; a skipped step leaves the state as it was."""
        if self.fired is None:
            return
        fired, tokens = reduce(self.fired), reduce(self.tokens)
        autoencoder.update_dead_latents(fired * ~skip, tokens * ~skip)
        self.fired = self.tokens = None


class StepMinimum:
    """The smallest of a value over the micro-batches of one optimizer step (BatchTopK's
    smallest positive kept activation), applied to the threshold once, when the step ends."""

    def __init__(self) -> None:
        self.minimum: Tensor | None = None

    def add(self, value: Tensor) -> None:
        """One micro-batch's value (+inf: none)."""
        self.minimum = value if self.minimum is None else torch.minimum(self.minimum, value)

    def apply(self, autoencoder, skip: Tensor, reduce: Callable[[Tensor], Tensor]) -> None:
        """`autoencoder.update_batchtopk_threshold` with the step's minimum, the minimum over
        ranks by `reduce`; a skipped step leaves the threshold as it was."""
        if self.minimum is None:
            return
        minimum = reduce(self.minimum.clone())
        autoencoder.update_batchtopk_threshold(torch.where(skip, float("inf"), minimum))
        self.minimum = None
