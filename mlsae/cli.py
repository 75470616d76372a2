"""What every command shares: parsing options into dataclasses, the data options, seeding,
and user mistakes ending with one `error:` line and exit status 2.

It imports nothing else of the package, so every layer can use it.
"""

import difflib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import simple_parsing
import torch

T = TypeVar("T")


class UserError(Exception):
    """A mistake of the user's (an option, a file, the data) that a command reports as one
    `error:` line. Subclass it, or raise a ValueError or OSError, which count too."""


class ConfigError(UserError, ValueError):
    """A command-line option that cannot work."""


class CommandStopped(Exception):
    """A command that stopped early on purpose (e.g. on SIGTERM), with what it saved.

    `run_command` prints the message and exits with `exit_status`.
    """

    exit_status = 1


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UserError, ValueError, OSError]
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


class _HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple_parsing's help, without a second default where the text gives one already
    or the default is None (whose meaning the text says)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _SuggestingParser(simple_parsing.ArgumentParser):
    """simple_parsing's parser, whose error for an unknown option names the closest one."""

    def error(self, message: str) -> NoReturn:
        super().error(message + closest_options(message, list(self._option_string_actions)))


def closest_options(message: str, options: list[str]) -> str:
    """` (did you mean --x?)` for the unknown options that argparse's `message` names, or
    an empty string when none is close to one of `options`."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown is None:
        return ""
    guesses = []
    for word in unknown.group(1).split():
        name = word.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if name.startswith("-") and close:
            guesses.append((name, close[0]))
    if len(guesses) == 1:
        return f" (did you mean {guesses[0][1]}?)"
    if guesses:
        return " (did you mean " + ", ".join(f"{o} for {n}" for n, o in guesses) + "?)"
    return ""


def parse(
    config_class: type[T], args: list[str] | None = None, description: str | None = None
) -> T:
    """Parse the command line into `config_class` (a dataclass whose field docstrings
    are the options' help). An unknown option exits with status 2 and names the closest
    valid one."""
    parser = _SuggestingParser(
        nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
        formatter_class=_HelpFormatter,
        description=description or config_class.__doc__,
    )
    parser.add_arguments(config_class, dest="config")
    return parser.parse_args(args).config


def initialize(seed: int) -> None:
    """Seed everything and set the process-wide options every command uses."""
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_float32_matmul_precision("high")
    # The frozen transformer is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def batches_in(max_tokens: int | float, batch_size: int, max_length: int) -> int:
    """The number of whole batches of `batch_size x max_length` tokens in `max_tokens`."""
    return int(max_tokens) // (batch_size * max_length)


DEFAULT_TEST_PATH = "data/test.jsonl.zst"
"""The file that the original test and analysis flows read (the Pile test split)."""

MISSING_TEST_DATA = (
    "{path} does not exist. It is the default: the cached test split of the Pile. "
    "Create it with, for example:\n"
    '  python -c "from datasets import load_dataset; '
    "load_dataset('monology/pile-uncopyrighted', data_files='test.jsonl.zst', split='train')"
    ".to_json('data/test.jsonl')\" && zstd data/test.jsonl\n"
    "or pass --path with a hub dataset id or local .jsonl[.zst]/.parquet/.txt files "
    "(e.g. quickstart/data --split test)."
)


def require_local_data(path: str) -> None:
    """Fail early, saying how to create it, when the default test file is missing."""
    if path == DEFAULT_TEST_PATH and not os.path.exists(path):
        raise FileNotFoundError(MISSING_TEST_DATA.format(path=path))


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into token blocks."""

    path: str = "monology/pile-uncopyrighted"
    """A hub dataset id, or local .jsonl[.zst]/.parquet/.txt files, a folder or a glob."""

    split: str = "train"
    """The split of a hub dataset (or of a local folder of split files)."""

    text_column: str = "text"
    """The column that holds the text."""

    max_length: int = 2048
    """Tokens per sequence."""

    batch_size: int = 1
    """Sequences per micro-batch."""

    max_tokens: int = 1_000_000_000
    """The number of tokens to read (to train on, or to evaluate or analyse)."""

    num_workers: int = 0
    """DataLoader worker processes."""

    skip_bad_documents: bool = False
    """Skip documents without text (a missing or null text column), with a warning that
    counts them, instead of stopping with an error naming the file and line."""

    @property
    def max_steps(self) -> int:
        """Micro-batches in `max_tokens`."""
        return batches_in(self.max_tokens, self.batch_size, self.max_length)
