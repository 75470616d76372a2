"""The paper's tables of test metrics across a sweep: `python -m figures.test_tables`.

From the CSV that test.py wrote for each model (`<analysis_dir>/test_<name>.csv`, one row
of means over test batches), two tables: per model, the metrics averaged over layers
(the `.../avg` columns), and per model and layer. The metrics: fraction of variance
unexplained (FVU), mean squared error (MSE) and L1 norm of the latents, in the
standardised space; L0; the fraction of dead latents (`train/dead/rel`; per model only);
the increase in cross-entropy loss when a layer's reconstruction is spliced into the
model (nats per token) and the KL divergence of the spliced next-token distributions from
the original ones (nats per sequence: summed over positions, as the original's
`reduction="batchmean"`).

Reads `<analysis_dir>/test_<name>.csv` for each model (run test.py first; the error names
the commands). Writes, in --output_dir: `test_avg.csv`, `.md`, `.tex` (a row per model),
`test_layers.csv`, `.md`, `.tex` (a row per model and layer) and `test_layers.png` (FVU
and CE-loss increase by layer, a line per model). Empty cells are metrics a CSV lacks.
"""

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from figures.common import (
    MODEL_COLUMNS,
    ModelSpec,
    SweepConfig,
    new_figure,
    parse_config,
    save_figure,
    value_cell,
    write_tables,
)
from mlsae.cli import UserError, run_command
from mlsae.lm.hub_access import require_local
from mlsae.names import csv_name


class Metric(NamedTuple):
    title: str
    latex_title: str
    key: str
    """The column of the tables."""
    prefix: str
    """The column of test.py's CSV: `<prefix>/avg` and `<prefix>/layer_<i>`, or the
    column itself for a metric that is not per layer."""
    per_layer: bool = True


METRICS = (
    Metric("FVU", "FVU", "fvu", "train/fvu"),
    Metric("MSE", "MSE", "mse", "train/mse"),
    Metric("L1", "L1", "l1", "train/l1"),
    Metric("L0", "L0", "l0", "train/l0"),
    Metric("Dead", "Dead", "dead", "train/dead/rel", per_layer=False),
    Metric("ΔCE loss", r"$\Delta$ CE loss", "loss_delta", "val/loss/delta"),
    Metric("KL div. (per sequence)", "KL div. (per sequence)", "kl_div", "val/logit/kldiv"),
)


@dataclass
class TablesConfig(SweepConfig):
    """Tables of the test metrics of the models of a sweep."""

    analysis_dir: str = "out"
    """Where test.py wrote its CSVs (its --output_dir)."""

    skip_missing: bool = False
    """Leave out the models without a test CSV instead of stopping."""


def read_test_csv(path: str | Path) -> dict[str, float] | None:
    """The first row of a CSV that test.py wrote, as floats (NaN where empty); None when it
    has no rows."""
    with open(path, newline="") as file:
        row = next(csv.DictReader(file), None)
    if row is None:
        return None
    return {
        name: float(value) if value not in ("", None) else math.nan for name, value in row.items()
    }


def layer_values(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    pattern = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)$")
    values = {}
    for name, value in metrics.items():
        match = pattern.match(name)
        if match:
            values[int(match[1])] = value
    return dict(sorted(values.items()))


def average(metrics: dict[str, float], metric: Metric) -> float:
    """`<prefix>/avg`, else the mean of the layers' values; the column itself for a metric
    that is not per layer; NaN when the CSV has none of them."""
    if not metric.per_layer:
        return metrics.get(metric.prefix, math.nan)
    if f"{metric.prefix}/avg" in metrics:
        return metrics[f"{metric.prefix}/avg"]
    values = list(layer_values(metrics, metric.prefix).values())
    return sum(values) / len(values) if values else math.nan


def avg_record(spec: ModelSpec, metrics: dict[str, float]) -> dict[str, Any]:
    return {**spec.columns(), **{metric.key: average(metrics, metric) for metric in METRICS}}


def layer_records(spec: ModelSpec, metrics: dict[str, float]) -> list[dict[str, Any]]:
    per_layer = [metric for metric in METRICS if metric.per_layer]
    by_metric = {metric.key: layer_values(metrics, metric.prefix) for metric in per_layer}
    layers = sorted({layer for values in by_metric.values() for layer in values})
    return [
        {
            **spec.columns(),
            "layer": layer,
            **{key: values.get(layer, math.nan) for key, values in by_metric.items()},
        }
        for layer in layers
    ]


def missing_csv_command(spec: ModelSpec, analysis_dir: str) -> str:
    return f"python test.py --repo_id {spec.repo_id} --output_dir {analysis_dir}"


def read_model_csv(spec: ModelSpec, path: Path, analysis_dir: str) -> dict[str, float]:
    metrics = read_test_csv(path)
    if metrics is None:
        raise UserError(
            f"{path} has no rows: run `{missing_csv_command(spec, analysis_dir)}` again"
        )
    return metrics


def missing_csvs(missing: list[tuple[ModelSpec, Path]], analysis_dir: str) -> str:
    """One line naming the models without a test CSV and the command that writes it."""
    if len(missing) == 1:
        spec, path = missing[0]
        command = missing_csv_command(spec, analysis_dir)
        return f"no test CSV for {spec.repo_id} ({path}): run `{command}` with the data options"
    models = ", ".join(f"{spec.repo_id} ({path})" for spec, path in missing)
    command = f"python test.py --repo_id <model> --output_dir {analysis_dir}"
    return f"no test CSV for {models}: run `{command}` with the data options for each"


def load_metrics(config: TablesConfig) -> list[tuple[ModelSpec, dict[str, float]]]:
    """The test metrics of each model; an error naming the models without any (whose local
    folder must exist), unless --skip_missing leaves them out."""
    found, missing = [], []
    for spec in config.models():
        path = Path(config.analysis_dir) / csv_name(spec.repo_id)
        if path.exists():
            found.append((spec, read_model_csv(spec, path, config.analysis_dir)))
        else:
            require_local(spec.repo_id, "the model folder")
            missing.append((spec, path))
    if missing:
        message = missing_csvs(missing, config.analysis_dir)
        if not config.skip_missing or not found:
            skip = ", or pass --skip_missing" if found else ""
            raise FileNotFoundError(message + skip)
        print(f"Skipping models: {message}")
    return found


def plot_layers(records: list[dict[str, Any]], path: Path) -> Path:
    figure = new_figure(8, 3)
    for axes, metric in zip(figure.subplots(1, 2), (METRICS[0], METRICS[5]), strict=True):
        for model in dict.fromkeys(record["model"] for record in records):
            rows = [record for record in records if record["model"] == model]
            layers, values = [row["layer"] for row in rows], [row[metric.key] for row in rows]
            axes.plot(layers, values, "o-", label=model)
        axes.set_xlabel("layer")
        axes.set_ylabel(metric.title)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.axes[0].legend(fontsize="small")
    return save_figure(figure, path)


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: TablesConfig = parse_config(TablesConfig, args, __doc__)
    loaded = load_metrics(config)
    output_dir = Path(config.output_dir)

    avg_columns = [*MODEL_COLUMNS, *((m.title, value_cell(m.key)) for m in METRICS)]
    avg_latex = [title for title, _ in MODEL_COLUMNS] + [m.latex_title for m in METRICS]
    paths = write_tables(
        output_dir / "test_avg",
        [avg_record(spec, metrics) for spec, metrics in loaded],
        avg_columns,
        avg_latex,
    )

    per_layer = [metric for metric in METRICS if metric.per_layer]
    layer_columns = [
        *MODEL_COLUMNS,
        ("Layer", value_cell("layer")),
        *((m.title, value_cell(m.key)) for m in per_layer),
    ]
    layer_latex = [title for title, _ in layer_columns[:4]] + [m.latex_title for m in per_layer]
    records = [record for spec, metrics in loaded for record in layer_records(spec, metrics)]
    paths += write_tables(output_dir / "test_layers", records, layer_columns, layer_latex)
    if records:
        paths.append(plot_layers(records, output_dir / "test_layers.png"))
    return paths


if __name__ == "__main__":
    run_command(main)
