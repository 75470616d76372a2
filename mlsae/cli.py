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


class CommandStopped(Exception):
    """A command that stopped early on purpose (e.g. on SIGTERM), with what it saved.

    `run_command` prints the message and exits with `exit_status`.
    """

    exit_status = 1


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
    """Call `main`; print a user error as `error: ...` and exit with status 2, and a
    command stopped on purpose (`CommandStopped`) with its message and exit status.

    Set MLSAE_TRACEBACK=1 to see the full traceback of a user error instead.
    """
    import os

    try:
        if os.environ.get("MLSAE_TRACEBACK"):
            return main()
        try:
            return main()
        except _user_errors() as error:
            logging.getLogger("mlsae").debug("command failed", exc_info=True)
            message = str(error).strip() or type(error).__name__
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
    except CommandStopped as stopped:
        print(str(stopped), file=sys.stderr)
        raise SystemExit(stopped.exit_status) from None
