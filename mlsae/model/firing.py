"""Which latents fired during one optimizer step, for the dead-latent state."""

from collections.abc import Callable

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
