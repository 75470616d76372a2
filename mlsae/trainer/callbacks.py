"""Lightning callbacks of the commands: a progress bar with a total and tokens per second."""

import math
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class TokensPerSecondBar(TQDMProgressBar):
    """The usual progress bar, with the training throughput in tokens/s and, where the
    stream's length is known (it is: `max_tokens` bounds it), a total and time remaining."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._start_time: float | None = None
        self._start_tokens = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_time = time.perf_counter()
        self._start_tokens = getattr(pl_module, "tokens_seen", 0)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._start_time is not None:
            elapsed = time.perf_counter() - self._start_time
            tokens = getattr(pl_module, "tokens_seen", 0) - self._start_tokens
            if elapsed > 0:
                metrics["tok/s"] = f"{tokens / elapsed:,.0f}"
        return metrics

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        if not math.isinf(total):
            return total
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        batches = getattr(dataset, "max_batches", None)
        if not batches:
            return total
        return math.ceil(batches / max(1, self.trainer.world_size))
