"""What the figure scripts share: the models of a sweep, parsing the command line, and
writing figures and tables (the dists of the models: figures.dists_input)."""

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from itertools import product
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from simple_parsing import field

from mlsae.analysis.config import DEFAULT_MODEL_NAME
from mlsae.cli import ConfigError, initialize, parse
from mlsae.names import get_repo_id, model_label, parse_repo_id
from mlsae.utils import get_device

DPI = 200


@dataclass
class ModelSpec:
    """One model of a sweep and what is known about it."""

    repo_id: str
    """A hub id or local folder of a pretrained -tfm model (or a dists file)."""

    label: str
    """A short name for file names and titles."""

    model_name: str | None = None
    expansion_factor: int | None = None
    k: int | None = None
    tuned_lens: bool = False

    transformer: str | None = None
    """Where to load the transformer's config and tokenizer from instead of the
    checkpoint's own model_name."""

    def columns(self) -> dict[str, Any]:
        """The columns that describe the model in every table."""
        return {
            "model": self.label,
            "repo_id": self.repo_id,
            "model_name": self.model_name,
            "expansion_factor": self.expansion_factor,
            "k": self.k,
            "tuned_lens": self.tuned_lens,
        }


def describe_model(repo_id: str, transformer: str | None = None) -> ModelSpec:
    """A `ModelSpec` for an explicit --repo_id, from its config.json when it is a local
    folder, otherwise from the published naming (`mlsae-<model>-x<E>-k<K>[-lens]`)."""
    spec = ModelSpec(repo_id=repo_id, label=model_label(repo_id), transformer=transformer)
    config_path = Path(repo_id) / "config.json"
    if config_path.is_file():
        with open(config_path) as file:
            config = json.load(file)
        spec.model_name = config.get("model_name")
        spec.expansion_factor = config.get("expansion_factor")
        spec.k = config.get("k")
        spec.tuned_lens = bool(config.get("tuned_lens", False))
        return spec
    published = parse_repo_id(repo_id)
    if published:
        spec.model_name = published.model
        spec.expansion_factor = published.expansion_factor
        spec.k = published.k
        spec.tuned_lens = published.tuned_lens
    return spec


@dataclass
class SweepConfig:
    """The models to plot: the published models of a sweep, or explicit --repo_id."""

    repo_id: list[str] | None = None
    """Pretrained -tfm models (hub ids or local folders) to plot instead of the published
    models of the sweep."""

    model_name: list[str] | None = None
    """Transformers of the published models (default EleutherAI/pythia-70m-deduped). With
    --repo_id, a single --model_name is where the transformer's config and tokenizer are
    loaded from instead of the checkpoint's own model_name."""

    expansion_factor: list[int] = dataclass_field(default_factory=lambda: [64])
    """Expansion factors of the published models."""

    k: list[int] = field(default_factory=lambda: [32], alias="-k")
    """k of the published models."""

    tuned_lens: bool = False
    """Use the published -lens models."""

    output_dir: str = "out/figures"
    """Where the figures and tables go."""

    device: str | None = None
    """The device to compute on (default: CUDA when available, otherwise the CPU)."""

    seed: int = 42
    """The seed of every random number generator."""

    def models(self) -> list[ModelSpec]:
        """The models of the sweep, in the order of the options."""
        if self.repo_id:
            transformer = None
            if self.model_name:
                if len(self.model_name) > 1:
                    raise ConfigError("with --repo_id, give at most one --model_name")
                transformer = self.model_name[0]
            return [describe_model(repo_id, transformer) for repo_id in self.repo_id]
        specs = []
        for model_name, expansion_factor, k in product(
            self.model_name or [DEFAULT_MODEL_NAME], self.expansion_factor, self.k
        ):
            repo_id = get_repo_id(model_name, expansion_factor, k, tuned_lens=self.tuned_lens)
            specs.append(
                ModelSpec(
                    repo_id=repo_id,
                    label=model_label(repo_id),
                    model_name=model_name,
                    expansion_factor=expansion_factor,
                    k=k,
                    tuned_lens=self.tuned_lens,
                )
            )
        return specs

    def torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device else get_device()


def parse_config(config_class: type, args: Sequence[str] | None, description: str | None):
    """Parse the command line (the module docstring is the description; an unknown option
    names the closest one) and seed."""
    config = parse(config_class, list(args) if args is not None else None, description)
    initialize(config.seed)
    return config


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces as single spaces, for an `error:` line."""
    return " ".join(text.split())


def describe_error(error: BaseException) -> str:
    """`Type: message` of `error`, on one line, to quote in another error's message."""
    return f"{type(error).__name__}: {one_line(str(error))}"


def new_figure(width: float, height: float) -> Figure:
    """A figure outside pyplot (no global state, no interactive backend)."""
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    print(f"Saved {path}")
    return path


def format_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def format_mean_sem(mean: float, sem: float, latex: bool = False, digits: int = 4) -> str:
    if math.isnan(mean):
        return ""
    plus_minus = r" \pm " if latex else " ± "
    text = f"{mean:.{digits}g}{plus_minus}{sem:.2g}"
    return f"${text}$" if latex else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rule = ["---", *("---:" for _ in header[1:])]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text)


def latex_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], escape_header: bool = True
) -> str:
    """A booktabs tabular; cells wrapped in `$...$` (and, without `escape_header`, the
    header) are kept as they are."""

    def cell(text: str) -> str:
        return text if text.startswith("$") and text.endswith("$") else latex_escape(text)

    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(cell(text) if escape_header else text for text in header) + r" \\",
        r"\midrule",
        *(" & ".join(cell(text) for text in row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"Saved {path}")
    return path


def write_csv(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> Path:
    """One row per record; the columns are the union of the records' keys, in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    print(f"Saved {path}")
    return path


Cell = Callable[[dict[str, Any], bool], str]
"""A displayed cell: from a record and whether the cell is LaTeX."""


def write_tables(
    stem: str | os.PathLike[str],
    records: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, Cell]],
    latex_header: Sequence[str] | None = None,
) -> list[Path]:
    """`<stem>.csv` (the records, every value at full precision), and `<stem>.md` and
    `<stem>.tex` with the displayed `columns` (title, cell); `latex_header` replaces the
    titles in the LaTeX table."""
    header = [title for title, _ in columns]
    markdown_rows = [[cell(record, False) for _, cell in columns] for record in records]
    latex_rows = [[cell(record, True) for _, cell in columns] for record in records]
    return [
        write_csv(f"{stem}.csv", records),
        write_text(f"{stem}.md", markdown_table(header, markdown_rows)),
        write_text(
            f"{stem}.tex",
            latex_table(latex_header or header, latex_rows, escape_header=latex_header is None),
        ),
    ]


def value_cell(key: str, digits: int = 4) -> Cell:
    return lambda record, latex: format_number(record.get(key), digits)


def mean_sem_cell(mean_key: str = "mean", sem_key: str = "sem") -> Cell:
    return lambda record, latex: format_mean_sem(record[mean_key], record[sem_key], latex)


MODEL_COLUMNS: list[tuple[str, Cell]] = [
    ("Model", value_cell("model")),
    ("Expansion factor", value_cell("expansion_factor")),
    ("k", value_cell("k")),
]


def plot_mean_sem(
    records: Sequence[dict[str, Any]], ylabel: str, path: str | os.PathLike[str]
) -> Path:
    """The `mean` ± `sem` of each record, one point per model (`model`), in order."""
    figure = new_figure(max(3.0, 0.6 * len(records) + 1.5), 3)
    axes = figure.subplots()
    positions = range(len(records))
    axes.errorbar(
        positions,
        [record["mean"] for record in records],
        yerr=[record["sem"] for record in records],
        fmt="o",
        capsize=3,
    )
    axes.set_xticks(positions, [record["model"] for record in records], rotation=30, ha="right")
    axes.set_xlim(-0.5, len(records) - 0.5)
    axes.set_ylabel(ylabel)
    return save_figure(figure, path)
