"""Non-finite residual streams and losses: noticed on the device, reported later.

Checking `isfinite(...).item()` every step would stop the GPU every step. Instead
the flags stay on the device: a step that saw a non-finite value is skipped by the
optimizer itself (fused Adam's `found_inf`, as mixed-precision training does), and
the first offending step and layers are read back only at logging intervals.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mlsae.cli import UserError


class NonFiniteError(UserError, RuntimeError):
    """Training met a NaN or infinity in the residual stream or the loss."""


class NonFiniteTracker:
    """Device-side flags for the current optimizer step and the first bad step."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = list(layers)
        self.step_bad: Tensor | None = None
        self.first_bad_step: Tensor | None = None
        self.bad_layers: Tensor | None = None
        self.loss_bad: Tensor | None = None
        self.skipped_steps: Tensor | None = None
        self._reported_skips = 0

    def _ensure(self, device: torch.device) -> None:
        if self.first_bad_step is None or self.first_bad_step.device != device:
            self.step_bad = torch.zeros((), dtype=torch.bool, device=device)
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
            self.bad_layers = torch.zeros(len(self.layers), dtype=torch.bool, device=device)
            self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
            self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)

    def sanitize(
        self, inputs: Float[Tensor, "layer batch pos d"]
    ) -> tuple[Float[Tensor, "layer batch pos d"], Bool[Tensor, " layer"]]:
        """Zero the non-finite values (so the step stays computable) and flag their layers."""
        self._ensure(inputs.device)
        finite = torch.isfinite(inputs)
        finite_layers = finite.flatten(1).all(dim=1)
        self.step_bad |= ~finite_layers.all()
        self._note_layers(~finite_layers)
        return torch.where(finite, inputs, 0.0), finite_layers

    def observe_loss(self, loss: Float[Tensor, ""]) -> None:
        self._ensure(loss.device)
        bad = ~torch.isfinite(loss.detach())
        self.step_bad |= bad
        self.loss_bad |= bad & (self.first_bad_step < 0)

    def _note_layers(self, bad_layers: Bool[Tensor, " layer"]) -> None:
        # Keep the layers of the first bad step only.
        first = self.first_bad_step < 0
        self.bad_layers |= bad_layers & first

    def end_step(self, step: int) -> Bool[Tensor, ""]:
        """Close the optimizer step `step`; returns whether it is to be skipped."""
        bad = self.step_bad.clone()
        is_first = bad & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(is_first, step, self.first_bad_step))
        self.skipped_steps += bad.long()
        self.step_bad.zero_()
        return bad

    def report(self, skip: bool) -> str | None:
        """Raise (or, with `skip`, describe) what was met since training began.

        This reads the flags back to the host: call it at logging intervals only.
        """
        if self.first_bad_step is None:
            return None
        first = int(self.first_bad_step.item())
        if first < 0:
            return None
        layers = [
            layer for layer, bad in zip(self.layers, self.bad_layers.tolist(), strict=True) if bad
        ]
        where = f"the residual stream of layer(s) {layers}" if layers else "the loss"
        message = f"non-finite values (NaN or inf) in {where} at optimizer step {first}"
        if not skip:
            raise NonFiniteError(
                message + "; that step was not applied. Check the data and the model's "
                "precision, or pass --skip_non_finite true to skip such batches."
            )
        skipped = int(self.skipped_steps.item())
        if skipped == self._reported_skips:
            return None
        self._reported_skips = skipped
        return f"{message}; skipped {skipped} step(s) so far"
