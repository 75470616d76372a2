"""Lightning's console output without its advertising, for every command that runs a Trainer."""

import logging

_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _WithoutAdvertising(logging.Filter):
    """Drops Lightning's advertising ("Tip: ... try installing litlogger ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Keep Lightning's useful messages, drop its advertising."""
    for name in _LIGHTNING_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _WithoutAdvertising) for f in target.filters):
            target.addFilter(_WithoutAdvertising())
