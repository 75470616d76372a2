"""Cosine similarity between the layer distributions of latents:
`python -m figures.dists_cos_sim`.

Per model, a heatmap of the cosine similarity between the distributions over layers
(`Dists.probs`, one vector of n_layers per latent) of every pair of a sample of the
latents that fired: at most --max_latents, drawn at random (--seed) and sorted in
ascending order of mean layer, so that latents active at the same layers form blocks
along the diagonal.

Reads, per model, its dists (see --dists_source; `<analysis_dir>/<owner>-<name>-
dists.safetensors`, computed there when missing). Writes, in --output_dir:
`dists_cos_sim_<model>.png` and `.csv` (the matrix: a row per sampled latent with its
`latent` and `layer_mean`, then one column per sampled latent, named by its index, in the
same order).
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from figures.common import (
    new_figure,
    parse_config,
    save_figure,
)
from figures.dists_input import DistsSweepConfig, load_dists
from mlsae.analysis.dists import Dists
from mlsae.cli import run_command


@dataclass
class DistsCosSimConfig(DistsSweepConfig):
    """Heatmaps of the cosine similarity between latents' distributions over layers."""

    max_latents: int = 512
    """The most latents in a heatmap (a random sample of those that fired)."""


def sample_latents(dists: Dists, max_latents: int, seed: int) -> Int[Tensor, " latent"]:
    """At most `max_latents` latents that fired, drawn without replacement, in ascending
    order of mean layer (ties in ascending latent order)."""
    fired = torch.isfinite(dists.layer_mean).nonzero().squeeze(1).cpu()
    if len(fired) > max_latents:
        generator = torch.Generator().manual_seed(seed)
        fired = fired[torch.randperm(len(fired), generator=generator)[:max_latents]].sort().values
    layer_mean = dists.layer_mean.cpu()[fired]
    return fired[layer_mean.argsort(stable=True)]


def dists_cos_sim(
    dists: Dists, latents: Int[Tensor, " latent"]
) -> Float[Tensor, "latent other_latent"]:
    """The cosine similarity between the distributions over layers of `latents`."""
    vectors = F.normalize(dists.probs.cpu()[:, latents].T.double(), dim=1)
    return (vectors @ vectors.T).float()


def write_matrix(latents: Tensor, layer_mean: Tensor, matrix: Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["latent", "layer_mean", *map(str, latents.tolist())])
        for latent, mean, row in zip(
            latents.tolist(), layer_mean.tolist(), matrix.tolist(), strict=True
        ):
            writer.writerow([latent, mean, *row])
    print(f"Saved {path}")


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: DistsCosSimConfig = parse_config(DistsCosSimConfig, args, __doc__)
    paths = []
    for spec in config.models():
        dists = load_dists(config, spec)
        latents = sample_latents(dists, config.max_latents, config.seed)
        matrix = dists_cos_sim(dists, latents)
        stem = Path(config.output_dir) / f"dists_cos_sim_{spec.label}"
        csv_path = Path(f"{stem}.csv")
        write_matrix(latents, dists.layer_mean.cpu()[latents], matrix, csv_path)

        figure = new_figure(4.5, 3.8)
        axes = figure.subplots()
        image = axes.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="none")
        axes.set_xlabel("latent (ascending mean layer)")
        axes.set_ylabel("latent (ascending mean layer)")
        axes.set_title(
            f"{spec.label}: {len(latents)} of {dists.n_latents} latents", fontsize="medium"
        )
        figure.colorbar(image, ax=axes, label="cosine similarity of layer distributions")
        paths += [csv_path, save_figure(figure, Path(f"{stem}.png"))]
    return paths


if __name__ == "__main__":
    run_command(main)
