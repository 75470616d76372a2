"""Heatmaps of every latent's distribution over layers: `python -m figures.dists_heatmaps`.

One heatmap per model: a row per latent, in ascending order of its mean layer (ties keep
the latent order), a column per layer, coloured by the latent's probability at the layer
(`Dists.probs`: its summed activations at the layer over its summed activations). Latents
that never fired are left out. With `--histogram`, a second panel shows the histogram of
the mean layers (as figures.dists_layer_mean). With more than 512 latents, each row of
the image is the mean of consecutive rows of the sorted matrix.

Reads, per model, its dists (see --dists_source; `<analysis_dir>/<owner>-<name>-
dists.safetensors`, computed there when missing). Writes, in --output_dir:
`dists_heatmap_<model>.png` and `.csv` (the sorted matrix: latent, layer_mean, layer_std,
count, then prob_layer_<i> for each layer).
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from figures.common import (
    new_figure,
    parse_config,
    save_figure,
)
from figures.dists_input import DistsSweepConfig, load_dists
from figures.dists_layer_mean import layer_mean_histogram, layer_mean_values, plot_histogram
from mlsae.analysis.dists import Dists
from mlsae.cli import run_command

COLORMAP = "magma_r"

# More rows than the image has pixels would be resampled, blurring layers together.
IMAGE_ROWS = 512


@dataclass
class DistsHeatmapsConfig(DistsSweepConfig):
    """Heatmaps of the distribution over layers of every latent, one per model."""

    histogram: bool = False
    """Add a panel with the histogram of the mean layers."""


@dataclass
class SortedDists:
    """The latents that fired, in ascending order of mean layer, and their statistics."""

    latents: Int[Tensor, " latent"]
    probs: Float[Tensor, "latent layer"]
    layer_mean: Float[Tensor, " latent"]
    layer_std: Float[Tensor, " latent"]
    count: Float[Tensor, " latent"]


def sort_by_layer_mean(dists: Dists) -> SortedDists:
    fired = torch.isfinite(dists.layer_mean).nonzero().squeeze(1)
    latents = fired[dists.layer_mean[fired].argsort(stable=True)]
    return SortedDists(
        latents=latents.cpu(),
        probs=dists.probs[:, latents].T.cpu(),
        layer_mean=dists.layer_mean[latents].cpu(),
        layer_std=dists.layer_std[latents].cpu(),
        count=dists.count[latents].cpu(),
    )


def write_sorted(sorted_dists: SortedDists, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layers = sorted_dists.probs.shape[1]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["latent", "layer_mean", "layer_std", "count"]
            + [f"prob_layer_{layer}" for layer in range(n_layers)]
        )
        columns = (
            sorted_dists.latents.tolist(),
            sorted_dists.layer_mean.tolist(),
            sorted_dists.layer_std.tolist(),
            sorted_dists.count.tolist(),
            sorted_dists.probs.tolist(),
        )
        for latent, layer_mean, layer_std, count, probs in zip(*columns, strict=True):
            writer.writerow([latent, layer_mean, layer_std, int(count), *probs])
    print(f"Saved {path}")


def image_rows(probs: Float[Tensor, "latent layer"], max_rows: int = IMAGE_ROWS) -> np.ndarray:
    """The rows of the heatmap: at most `max_rows`, each the mean of consecutive latents."""
    if len(probs) <= max_rows:
        return probs.numpy()
    return np.stack([chunk.mean(0) for chunk in np.array_split(probs.numpy(), max_rows)])


def plot_dists(dists: Dists, sorted_dists: SortedDists, title: str, histogram: bool):
    figure = new_figure(7.5 if histogram else 3.5, 4)
    axes = figure.subplots(1, 2 if histogram else 1, squeeze=False)[0]
    image = axes[0].imshow(
        image_rows(sorted_dists.probs),
        aspect="auto",
        cmap=COLORMAP,
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(-0.5, dists.n_layers - 0.5, len(sorted_dists.latents), 0),
    )
    axes[0].set_xticks(range(dists.n_layers))
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("latent (ascending mean layer)")
    figure.colorbar(image, ax=axes[0], label="P(layer | latent)")
    if histogram:
        values = layer_mean_values(dists)
        plot_histogram(axes[1], layer_mean_histogram(values, dists.n_layers, False), False)
        figure.get_layout_engine().set(wspace=0.12)  # room between the colour bar and the axis
    over = "" if dists.tokens is None else f" over {dists.tokens:,} tokens"
    fired = f"{len(sorted_dists.latents)} of {dists.n_latents} latents fired"
    figure.suptitle(f"{title}: {fired}{over}")
    return figure


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: DistsHeatmapsConfig = parse_config(DistsHeatmapsConfig, args, __doc__)
    paths = []
    for spec in config.models():
        dists = load_dists(config, spec)
        sorted_dists = sort_by_layer_mean(dists)
        stem = Path(config.output_dir) / f"dists_heatmap_{spec.label}"
        csv_path = Path(f"{stem}.csv")
        write_sorted(sorted_dists, csv_path)
        figure = plot_dists(dists, sorted_dists, spec.label, config.histogram)
        paths += [csv_path, save_figure(figure, Path(f"{stem}.png"))]
    return paths


if __name__ == "__main__":
    run_command(main)
