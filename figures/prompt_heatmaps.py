"""Which layers light up on one prompt: `python -m figures.prompt_heatmaps --prompt ...`.

Per model, a heatmap of the largest latent activation (after ReLU) at each layer (rows)
and token of the prompt (columns), from `mlsae.analysis.heatmaps.prompt_latents` (the
prompt's analysis, `mlsae.analysis.prompt`).
Special-token positions are blank unless `--count_special_tokens`.

Reads each pretrained model (local folder or hub) and runs it on the prompt. Writes, in
--output_dir: `prompt_heatmap_<model>.png` and `.csv` (a row per layer and position:
layer, block, position, token, max_activation).
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from figures.common import SweepConfig, new_figure, parse_config, save_figure
from mlsae.analysis.heatmaps import DEFAULT_PROMPT, PromptLatents, prompt_latents
from mlsae.analysis.source import load_source
from mlsae.cli import run_command
from mlsae.metrics import FIRING_THRESHOLD


@dataclass
class PromptHeatmapsConfig(SweepConfig):
    """Heatmaps of the largest latent activation by layer and token of a prompt."""

    prompt: str = DEFAULT_PROMPT
    """The text to analyse."""

    threshold: float = FIRING_THRESHOLD
    """The activation (after ReLU) above which a latent counts as firing."""

    count_special_tokens: bool = False
    """Count the zeroed special-token positions (BOS/EOS/PAD), as the original did."""


def display_token(token: str) -> str:
    """Whitespace made visible, so that every tick label shows something."""
    return repr(token)[1:-1].replace(" ", "\u2423") or "\u2205"


def write_max_activation(result: PromptLatents, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["layer", "block", "position", "token", "max_activation"])
        for layer, row in enumerate(result.max_activation.tolist()):
            for position, value in enumerate(row):
                writer.writerow(
                    [layer, result.blocks[layer], position, result.tokens[position], value]
                )
    print(f"Saved {path}")


def plot_max_activation(result: PromptLatents, title: str):
    n_layers, n_positions = result.max_activation.shape
    figure = new_figure(max(4.0, 0.35 * n_positions + 1.5), max(2.0, 0.3 * n_layers + 1.2))
    axes = figure.subplots()
    matrix = np.ma.masked_invalid(result.max_activation.numpy())
    image = axes.imshow(matrix, aspect="auto", cmap="magma_r", vmin=0, interpolation="none")
    axes.set_xticks(
        range(n_positions),
        [display_token(token) for token in result.tokens],
        rotation=90,
        fontsize="small",
    )
    axes.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)])
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize="medium")
    figure.colorbar(image, ax=axes, label="max activation")
    return figure


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: PromptHeatmapsConfig = parse_config(PromptHeatmapsConfig, args, __doc__)
    paths = []
    for spec in config.models():
        source = load_source(
            spec.repo_id,
            config.torch_device(),
            count_special_tokens=config.count_special_tokens,
            model_name=spec.transformer,
        )
        result = prompt_latents(source.model, config.prompt, config.threshold)
        stem = Path(config.output_dir) / f"prompt_heatmap_{spec.label}"
        csv_path = Path(f"{stem}.csv")
        write_max_activation(result, csv_path)
        title = f"{spec.label}: {len(result.latents)} latents fire"
        figure = plot_max_activation(result, title)
        paths += [csv_path, save_figure(figure, Path(f"{stem}.png"))]
    return paths


if __name__ == "__main__":
    run_command(main)
