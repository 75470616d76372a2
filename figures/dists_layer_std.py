"""The spread of latents over layers across a sweep: `python -m figures.dists_layer_std`.

Per model, the mean, variance, standard deviation and standard error (SEM) over latents
of each latent's standard deviation over layers (`Dists.layer_std`, in layers; NaN for
latents that never fired, which the statistics skip, except that the SEM divides by the
square root of all the latents, as in the original: `mlsae.analysis.dists.layer_std_stats`).

Reads, per model, its dists (see --dists_source; `<analysis_dir>/<owner>-<name>-
dists.safetensors`, computed there when missing). Writes, in --output_dir:
`dists_layer_std.csv` (a row per model), `dists_layer_std.md` and `.tex` (mean ± SEM)
and `dists_layer_std.png` (mean ± SEM per model).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from figures.common import (
    MODEL_COLUMNS,
    mean_sem_cell,
    parse_config,
    plot_mean_sem,
    value_cell,
    write_tables,
)
from figures.dists_input import DistsSweepConfig, load_dists
from mlsae.analysis.dists import layer_std_stats
from mlsae.cli import run_command


def layer_std_records(config: DistsSweepConfig) -> list[dict[str, Any]]:
    records = []
    for spec in config.models():
        dists = load_dists(config, spec)
        records.append(
            {
                **spec.columns(),
                "n_layers": dists.n_layers,
                "n_latents": dists.n_latents,
                **layer_std_stats(dists.layer_std),
            }
        )
    return records


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: DistsSweepConfig = parse_config(DistsSweepConfig, args, __doc__)
    records = layer_std_records(config)
    stem = Path(config.output_dir) / "dists_layer_std"
    columns = [
        *MODEL_COLUMNS,
        ("Latents", value_cell("n_latents")),
        ("Layer std", mean_sem_cell()),
    ]
    paths = write_tables(stem, records, columns)
    paths.append(plot_mean_sem(records, "std over layers (mean ± SEM)", f"{stem}.png"))
    return paths


if __name__ == "__main__":
    run_command(main)
