"""Running a command: user mistakes end with one clear line, not a traceback."""

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from mlsae.model.hub import CheckpointError
from mlsae.model.non_finite import NonFiniteError

T = TypeVar("T")


class ConfigError(ValueError):
    """A command-line option that cannot work."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        ConfigError,
        CheckpointError,
        NonFiniteError,
        FileNotFoundError,
        ValueError,
        OSError,
    ]
    try:
        from huggingface_hub.errors import HFValidationError

        errors.append(HFValidationError)
    except ImportError:
        pass
    return tuple(errors)


def run_command(main: Callable[[], T]) -> T:
    """Call `main`; print a user error as `error: ...` and exit with status 2.

    Set MLSAE_TRACEBACK=1 to see the full traceback instead.
    """
    import os

    if os.environ.get("MLSAE_TRACEBACK"):
        return main()
    try:
        return main()
    except _user_errors() as error:
        logging.getLogger("mlsae").debug("command failed", exc_info=True)
        message = str(error).strip() or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
