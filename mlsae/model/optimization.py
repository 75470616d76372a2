"""The optimizer and its learning-rate schedule."""

import math
from typing import Any

import torch

from mlsae.sparse import make_adam


def learning_rate_factor(step: int, warmup: int, decay: int, total_steps: float) -> float:
    """The learning rate's multiplier at optimizer step `step`: a linear warm-up from 0
    over the first `warmup` steps and a linear decay to 0 over the last `decay` of
    `total_steps` (none where it is infinite)."""
    scale = 1.0
    if warmup and step < warmup:
        scale = (step + 1) / warmup
    if decay and math.isfinite(total_steps) and step >= total_steps - decay:
        scale = min(scale, max(0.0, (total_steps - step) / decay))
    return scale


def configure_adam(
    parameters: Any, lr: float, eps: float, warmup: int, decay: int, total_steps: float
) -> Any:
    """Lightning's `configure_optimizers` result: Adam (`mlsae.sparse.make_adam`), with a
    per-step schedule where warm-up or decay is asked for."""
    optimizer = make_adam(parameters, lr=lr, eps=eps)
    if not warmup and not decay:
        return optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup, decay, total_steps)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
