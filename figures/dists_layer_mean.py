"""Histograms of the mean layer of every latent: `python -m figures.dists_layer_mean`.

A latent's mean layer is the mean of its distribution over layers (`Dists.layer_mean`:
the layer index 0 .. n_layers - 1 weighted by the latent's summed activations). Latents
that never fired are left out. With `--noninteger`, the histogram is of the distance
from the mean layer to the nearest integer (0 .. 0.5), as in the original's figure: 0 for
a latent active at one layer only. With `--multi_layer_only`, only the latents that fired
at more than one layer count.

Reads, per model, its dists (see --dists_source; `<analysis_dir>/<owner>-<name>-
dists.safetensors`, computed there when missing). Writes, in --output_dir:
`dists_layer_mean[_noninteger][_multi_layer]_<model>.png` and `.csv` (one row per bin:
bin_left, bin_right, count, density).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes

from figures.common import (
    new_figure,
    parse_config,
    save_figure,
)
from figures.dists_input import DistsSweepConfig, load_dists
from mlsae.analysis.dists import Dists
from mlsae.cli import run_command

BINS_PER_LAYER = 16


@dataclass
class LayerMeanConfig(DistsSweepConfig):
    """Histograms of the mean layer of every latent, one per model."""

    noninteger: bool = False
    """Plot the distance from the mean layer to the nearest integer instead."""

    multi_layer_only: bool = False
    """Count only the latents that fired at more than one layer."""

    bins_per_layer: int = BINS_PER_LAYER
    """Histogram bins per layer (the original used 16)."""


@dataclass
class Histogram:
    edges: np.ndarray
    counts: np.ndarray

    @property
    def density(self) -> np.ndarray:
        """Counts over (total count x bin width): integrates to 1, as numpy's density."""
        total = self.counts.sum()
        if total == 0:
            return np.zeros_like(self.counts, dtype=float)
        return self.counts / total / np.diff(self.edges)


def layer_mean_values(
    dists: Dists, noninteger: bool = False, multi_layer_only: bool = False
) -> np.ndarray:
    """The mean layer (or its distance to the nearest integer) of each latent that fired
    (at more than one layer, with `multi_layer_only`)."""
    keep = torch.isfinite(dists.layer_mean)
    if multi_layer_only:
        keep &= (dists.counts > 0).sum(0) > 1
    values = dists.layer_mean[keep].double().cpu().numpy()
    if noninteger:
        values = np.abs(values - np.round(values))
    return values


def layer_mean_histogram(
    values: np.ndarray, n_layers: int, noninteger: bool, bins_per_layer: int = BINS_PER_LAYER
) -> Histogram:
    """`bins_per_layer * n_layers` bins over 0 .. n_layers - 1 (0 .. 0.5 with `noninteger`)."""
    value_range = (0.0, 0.5) if noninteger else (0.0, float(max(n_layers - 1, 1)))
    counts, edges = np.histogram(values, bins=bins_per_layer * n_layers, range=value_range)
    return Histogram(edges, counts)


def xlabel(noninteger: bool) -> str:
    return "distance of the mean layer from an integer" if noninteger else "mean layer"


def plot_histogram(axes: Axes, histogram: Histogram, noninteger: bool) -> None:
    axes.stairs(histogram.counts, histogram.edges, fill=True, color="tab:blue")
    axes.set_xlabel(xlabel(noninteger))
    axes.set_ylabel("latents")
    axes.set_xlim(histogram.edges[0], histogram.edges[-1])


def write_histogram(histogram: Histogram, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = zip(
        histogram.edges[:-1], histogram.edges[1:], histogram.counts, histogram.density, strict=True
    )
    with open(path, "w") as file:
        file.write("bin_left,bin_right,count,density\n")
        for left, right, count, density in rows:
            file.write(f"{float(left)!r},{float(right)!r},{int(count)},{float(density)!r}\n")
    print(f"Saved {path}")


def output_stem(config: LayerMeanConfig, label: str) -> Path:
    name = "dists_layer_mean"
    if config.noninteger:
        name += "_noninteger"
    if config.multi_layer_only:
        name += "_multi_layer"
    return Path(config.output_dir) / f"{name}_{label}"


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: LayerMeanConfig = parse_config(LayerMeanConfig, args, __doc__)
    paths = []
    for spec in config.models():
        dists = load_dists(config, spec)
        values = layer_mean_values(dists, config.noninteger, config.multi_layer_only)
        histogram = layer_mean_histogram(
            values, dists.n_layers, config.noninteger, config.bins_per_layer
        )
        stem = output_stem(config, spec.label)
        csv_path, png_path = Path(f"{stem}.csv"), Path(f"{stem}.png")
        write_histogram(histogram, csv_path)

        figure = new_figure(4.5, 3)
        axes = figure.subplots()
        plot_histogram(axes, histogram, config.noninteger)
        axes.set_title(f"{spec.label}: {len(values)} latents", fontsize="medium")
        paths += [csv_path, save_figure(figure, png_path)]
    return paths


if __name__ == "__main__":
    run_command(main)
