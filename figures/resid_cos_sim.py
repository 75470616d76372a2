"""Adjacent-layer cosine similarity of residual vectors: `python -m figures.resid_cos_sim`.

Per transformer (`--model_name`; no autoencoder is needed), the mean over tokens of the
cosine similarity between a token's residual vector at one layer and at the next, ± its
standard deviation over tokens, plain and centred (each layer's mean over the stream
subtracted, see `--centre`), from `mlsae.analysis.geometry`. The first transition is from
the embeddings (the first block's input) to the first block's output; `--embeddings false`
leaves it out. A second panel shows the mean norm of the vectors at each layer.

Reads `<analysis_dir>/<name>-geometry.csv` (name: the last part of --model_name) and
computes it there with mlsae.analysis.geometry on the data options when it is missing (or
with --recompute). Writes, in --output_dir: `resid_cos_sim_<name>.png` and `.csv` (a row
per layer: layer, block, transition, norm, cos_sim, cos_sim_std, centred_cos_sim,
centred_cos_sim_std; the similarities are to the next layer, NaN for the last).
"""

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from figures.common import (
    describe_error,
    new_figure,
    one_line,
    parse_config,
    save_figure,
    write_csv,
)
from mlsae.analysis.config import DEFAULT_MODEL_NAME
from mlsae.analysis.geometry import Centre, GeometryConfig, save_geometry
from mlsae.analysis.run import save_and_report
from mlsae.cli import DataConfig, UserError, require_local_data, run_command
from mlsae.lm.hub_access import require_local

FLOAT_COLUMNS = ("norm", "cos_sim", "cos_sim_std", "centred_cos_sim", "centred_cos_sim_std")


@dataclass
class ResidCosSimConfig:
    """Adjacent-layer cosine similarity and norms of transformers' residual streams."""

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    model_name: list[str] = dataclass_field(default_factory=lambda: [DEFAULT_MODEL_NAME])
    """Transformers (hub ids or local folders of causal LMs and their tokenizers)."""

    layers: list[int] | None = None
    """The blocks to read (default: all)."""

    embeddings: bool = True
    """Include the embeddings (the first block's input) as the first row."""

    centre: Centre = "stream"
    """When computing: centre each layer's vectors by its mean over the whole stream (two
    passes) or over each batch (one pass)."""

    count_special_tokens: bool = False
    """When computing: count the special-token positions (BOS/EOS/PAD)."""

    recompute: bool = False
    """Compute the geometry even when --analysis_dir has it."""

    analysis_dir: str = "out"
    """Where mlsae.analysis.geometry keeps its CSVs: read from there, and written there
    when computed."""

    output_dir: str = "out/figures"
    """Where the figures and tables go."""

    device: str | None = None
    """The device to compute on (default: CUDA when available, otherwise the CPU)."""

    seed: int = 42
    """The seed of every random number generator."""


def geometry_config(config: ResidCosSimConfig, model_name: str) -> GeometryConfig:
    return GeometryConfig(
        data=config.data,
        model_name=model_name,
        layers=config.layers,
        centre=config.centre,
        count_special_tokens=config.count_special_tokens,
        output_dir=config.analysis_dir,
        device=config.device,
        seed=config.seed,
    )


def read_geometry(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        for column in ("layer", "block", "tokens"):
            row[column] = int(row[column])
        for column in FLOAT_COLUMNS:
            row[column] = float(row[column]) if row[column] not in ("", None) else math.nan
    return rows


def load_geometry(config: ResidCosSimConfig, model_name: str) -> list[dict[str, Any]]:
    """The rows of the geometry CSV of `model_name`, computed when missing."""
    geometry = geometry_config(config, model_name)
    path = Path(config.analysis_dir) / f"{geometry.name()}-geometry.csv"
    if path.exists() and not config.recompute:
        print(f"Geometry of {model_name}: {path}")
        return read_cached_geometry(path)
    require_local(model_name, "the language model folder")
    try:
        require_local_data(config.data.path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            one_line(
                f"cannot compute the geometry of {model_name}: {error} Or compute it first "
                f"with `python -m mlsae.analysis.geometry --model_name {model_name} "
                f"--output_dir {config.analysis_dir} --path <data> --max_tokens <n>`"
            )
        ) from error
    save_and_report(geometry, save_geometry)
    return read_geometry(path)


def read_cached_geometry(path: Path) -> list[dict[str, Any]]:
    """The rows of a geometry CSV kept from an earlier run; an error that says to compute it
    again when it is not one."""
    try:
        rows = read_geometry(path)
    except (KeyError, ValueError) as error:
        problem = describe_error(error)
    else:
        if rows:
            return rows
        problem = "it has no rows"
    raise UserError(
        f"{path} is not a geometry CSV of mlsae.analysis.geometry ({problem}): pass "
        "--recompute to compute it again"
    )


def layer_name(layer: int) -> str:
    return "emb" if layer < 0 else str(layer)


def with_transitions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each with the `transition` its similarities describe (`emb->0`, `0->1`...;
    empty for the last row)."""
    result = []
    for index, row in enumerate(rows):
        following = rows[index + 1]["layer"] if index + 1 < len(rows) else None
        transition = (
            "" if following is None else f"{layer_name(row['layer'])}->{layer_name(following)}"
        )
        record = {"layer": row["layer"], "block": row["block"], "transition": transition}
        result.append(record | {column: row[column] for column in FLOAT_COLUMNS})
    return result


def plot_geometry(rows: list[dict[str, Any]], title: str):
    transitions = [row for row in rows if row["transition"]]
    figure = new_figure(8, 3)
    similarity_axes, norm_axes = figure.subplots(1, 2)
    positions = range(len(transitions))
    for column, label in (("cos_sim", "plain"), ("centred_cos_sim", "centred")):
        means = [row[column] for row in transitions]
        stds = [row[f"{column}_std"] for row in transitions]
        similarity_axes.errorbar(positions, means, yerr=stds, fmt="o-", capsize=3, label=label)
    similarity_axes.set_xticks(positions, [row["transition"] for row in transitions])
    similarity_axes.set_xlabel("layer -> next layer")
    similarity_axes.set_ylabel("cosine similarity (mean ± std)")
    similarity_axes.legend(fontsize="small")

    norm_axes.plot(range(len(rows)), [row["norm"] for row in rows], "o-")
    norm_axes.set_xticks(range(len(rows)), [layer_name(row["layer"]) for row in rows])
    norm_axes.set_xlabel("layer")
    norm_axes.set_ylabel("mean norm")
    figure.suptitle(title)
    return figure


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: ResidCosSimConfig = parse_config(ResidCosSimConfig, args, __doc__)
    paths = []
    for model_name in config.model_name:
        rows = load_geometry(config, model_name)
        if not config.embeddings:
            rows = [row for row in rows if row["layer"] >= 0]
        records = with_transitions(rows)
        name = geometry_config(config, model_name).name()
        stem = Path(config.output_dir) / f"resid_cos_sim_{name}"
        paths.append(write_csv(f"{stem}.csv", records))
        title = f"{model_name}: {rows[0]['tokens']} tokens"
        paths.append(save_figure(plot_geometry(records, title), Path(f"{stem}.png")))
    return paths


if __name__ == "__main__":
    run_command(main)
