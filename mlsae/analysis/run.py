"""How an analysis runs as a command: parse its options, seed, compute and write its outputs,
say where they went, push them to the hub.

Every `python -m mlsae.analysis.<name>` is `run_command(main)` (a user mistake ends with one
`error:` line and exit status 2), and every `main` is one line:

    def main(args: list[str] | None = None) -> Dists:
        return run_analysis(DistsConfig, save_dists, args)

An analysis supplies its options (a dataclass with a `seed`) and a `save` function that
computes, writes and returns a `Saved`: the result, the files it wrote and, if it publishes
a hub dataset, how to push it. `run_analysis` does the rest; `save_and_report` does the same
for a config built in code (the figure scripts). An analysis of a pretrained model starts
from `AnalysedModel.load(config)`: the model as a `LatentSource`, its held-out token stream,
where its outputs go and what they record of it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from torch.utils.data import DataLoader

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.identity import OutputOrigin, replacement_note, source_identity
from mlsae.analysis.source import MLSAESource, StackSource
from mlsae.cli import ConfigError, initialize, parse
from mlsae.lm.data import held_out_stream
from mlsae.names import cache_path, derived_name

R = TypeVar("R")


class Seeded(Protocol):
    """The options every analysis has."""

    seed: int


C = TypeVar("C", bound=Seeded)


@dataclass
class Saved(Generic[R]):
    """What an analysis computed and where it wrote it."""

    result: R
    """What the analysis returns (and `main` too)."""

    outputs: list[tuple[str, Path]]
    """What was written where: `(description, path)`, printed as `Saved <description> to
    <path>`."""

    notes: list[str] = field(default_factory=list)
    """Lines printed before the outputs: headline numbers, an output of another model that
    was replaced."""

    push: Callable[[str], Any] | None = None
    """Pushes the result to the hub as the dataset it is given (None: the analysis publishes
    none)."""

    dataset_id: str | None = None
    """The hub dataset that `push` writes to."""


def pushes_to_hub(config: object) -> bool:
    """Whether the options ask for the result on the hub (`--push_to_hub`)."""
    return bool(getattr(config, "push_to_hub", False))


def save_and_report(config: C, save: Callable[[C], Saved[R]]) -> R:
    """`save(config)`, then print what was written where and, with `--push_to_hub`, push the
    result to the hub; returns the result.

    Raises ConfigError before computing anything when `--push_to_hub` is set for an analysis
    that publishes no hub dataset (`hub_suffix` of its options is None).
    """
    if pushes_to_hub(config) and getattr(config, "hub_suffix", None) is None:
        raise ConfigError(
            "--push_to_hub: this analysis publishes no hub dataset; leave the option out "
            "(its outputs go to --output_dir)"
        )
    saved = save(config)
    for note in saved.notes:
        print(note)
    for description, path in saved.outputs:
        print(f"Saved {description} to {path}")
    if pushes_to_hub(config) and saved.push is not None and saved.dataset_id is not None:
        saved.push(saved.dataset_id)
        print(f"Pushed to the hub dataset {saved.dataset_id}")
    return saved.result


def run_analysis(
    config_class: type[C], save: Callable[[C], Saved[R]], args: list[str] | None = None
) -> R:
    """Parse `args` (default: the command line) into `config_class`, seed everything with
    its `seed`, and `save_and_report`; returns the result."""
    config = parse(config_class, args)
    initialize(config.seed)
    return save_and_report(config, save)


@dataclass
class AnalysedModel:
    """The pretrained model that an analysis reads, and where its outputs go."""

    config: AnalysisConfig
    repo_id: str
    """The model as the user named it (hub id or local folder), or the published id; for
    a stack of per-layer SAEs, the SAEs as --sae gave them."""

    source: MLSAESource | StackSource

    output_name: str | None = None
    """What the outputs are named after, when not `repo_id` (a stack's `-stack` name)."""

    @staticmethod
    def load(config: AnalysisConfig) -> "AnalysedModel":
        """The model of `config`, on its device (`ConfigError` for options that cannot go
        together, before anything is loaded)."""
        config.check_model_options()
        name, output_name = config.analysed_name(), config.output_name()
        return AnalysedModel(config, name, config.load_source(), output_name)

    @cached_property
    def origin(self) -> OutputOrigin:
        """What the outputs record of the model (see `mlsae.analysis.identity`); hashing
        the weights, it is computed only for the analyses that record it."""
        return OutputOrigin(model=source_identity(self.source), repo_id=self.repo_id)

    def batches(self) -> DataLoader:
        """The held-out token stream of the data options (`max_steps` batches)."""
        return held_out_stream(self.config.data, self.source.tokenizer)

    @property
    def max_steps(self) -> int:
        return self.config.data.max_steps

    def output_path(self, suffix: str, extension: str) -> Path:
        """`<output_dir>/<owner>-<name>-<suffix>.<extension>` (see `mlsae.names.cache_path`)."""
        return cache_path(
            self.output_name or self.repo_id, suffix, extension, self.config.output_dir
        )

    def dataset_id(self) -> str | None:
        """The hub dataset of the analysis (`mlsae.names.derived_name`), if it has one."""
        suffix = getattr(self.config, "hub_suffix", None)
        return None if suffix is None else derived_name(self.output_name or self.repo_id, suffix)

    def replacement_notes(self, path: str | Path, previous: OutputOrigin | None) -> list[str]:
        """The line to print when the output at `path` was another model's, else none."""
        note = replacement_note(path, previous, self.origin)
        return [note] if note else []
