"""Which latents fire where on one prompt: `python -m mlsae.analysis.heatmaps --prompt ...`.

For a prompt, `prompt_latents` gives its tokens, the largest latent activation at each
(layer, position) and, for every latent that fires (activation after ReLU above
`--threshold`), its activation at every (layer, position), all read from the prompt's
analysis (`mlsae.analysis.prompt`). Layers are indices into the model's stack
(0 .. n_layers - 1; `blocks` maps them to the transformer's blocks). Special-token
positions are left out (NaN maximum, no latent fires there) unless `--count_special_tokens`.

Outputs, in `--output_dir` (default `out/`): `<owner>-<name>-prompt.json` (tokens, the
maximum per layer and position, and per firing latent its mean layer and firings),
`...-prompt-max.csv` (one row per layer and position) and `...-prompt-latents.csv` (one
row per firing: latent, layer, block, position, token, activation).
"""

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.prompt import PromptAnalysis, analyse_prompt, mean_layer
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.cli import run_command
from mlsae.files import atomic_output
from mlsae.metrics import FIRING_THRESHOLD
from mlsae.model.lightning import MLSAETransformer

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"


@dataclass
class HeatmapsConfig(AnalysisConfig):
    """The latents of a pretrained MLSAE on one prompt, at every layer and position.

    The data options are not used: the only text is the prompt."""

    stack_refusal: ClassVar[str | None] = (
        "heatmaps follows each latent over layers (its mean layer), and latent i of one "
        "layer's SAE is unrelated to latent i of another's: the explorer shows a stack's "
        "latents on a prompt (python -m mlsae.explorer --sae ... --model_name ...)"
    )

    prompt: str = DEFAULT_PROMPT
    """The text to analyse."""

    threshold: float = FIRING_THRESHOLD
    """The activation (after ReLU) above which a latent counts as firing."""


@dataclass
class PromptLatents:
    """The latents of one prompt."""

    token_ids: Int[Tensor, " pos"]
    tokens: list[str]
    """The token strings."""

    blocks: list[int]
    """The transformer block of each layer of the stack."""

    max_activation: Float[Tensor, "layer pos"]
    """The largest activation (after ReLU) at each layer and position; NaN where the
    position does not count."""

    latents: Int[Tensor, " latent"]
    """The latents that fire somewhere, in ascending order of their mean layer."""

    activations: Float[Tensor, "latent layer pos"]
    """The activation (after ReLU) of each of `latents` at each layer and position (0
    where it is not selected or the position does not count)."""

    counted: Bool[Tensor, " pos"]
    """The positions that count."""

    threshold: float

    @property
    def layer_mean(self) -> Float[Tensor, " latent"]:
        """Per firing latent, the mean layer of its activations summed over positions."""
        return mean_layer(self.activations)

    def firings(self) -> dict[int, list[dict[str, Any]]]:
        """Per firing latent, where it fires: layer, block, position, token, activation."""
        result: dict[int, list[dict[str, Any]]] = {}
        for row, latent in enumerate(self.latents.tolist()):
            fires = self.activations[row] > self.threshold
            layers, positions = fires.nonzero(as_tuple=True)
            result[latent] = [
                {
                    "layer": layer,
                    "block": self.blocks[layer],
                    "position": position,
                    "token": self.tokens[position],
                    "activation": float(self.activations[row, layer, position]),
                }
                for layer, position in zip(layers.tolist(), positions.tolist(), strict=True)
            ]
        return result

    def to_json(self) -> dict[str, Any]:
        firings = self.firings()
        return {
            "token_ids": self.token_ids.tolist(),
            "tokens": self.tokens,
            "blocks": self.blocks,
            "counted": self.counted.tolist(),
            "threshold": self.threshold,
            "max_activation": [
                [None if value != value else value for value in row]
                for row in self.max_activation.tolist()
            ],
            "latents": [
                {"latent": latent, "layer_mean": layer_mean, "firings": firings[latent]}
                for latent, layer_mean in zip(
                    self.latents.tolist(), self.layer_mean.tolist(), strict=True
                )
            ],
        }


def firing_latents(
    values: Float[Tensor, "layer pos k"], indices: Int[Tensor, "layer pos k"], threshold: float
) -> tuple[Int[Tensor, " latent"], Float[Tensor, "latent layer pos"]]:
    """The latents whose selected activation exceeds `threshold` somewhere, in ascending
    order, and each one's activation at every layer and position (every selected value,
    also where it is below the threshold; 0 where it is not selected)."""
    n_layers, n_positions, _ = indices.shape
    latents = indices[values > threshold].unique()
    of_firing = torch.isin(indices, latents)
    layer, position, _ = of_firing.nonzero(as_tuple=True)
    row = torch.searchsorted(latents, indices[of_firing])
    activations = values.new_zeros((len(latents), n_layers, n_positions))
    activations[row, layer, position] = values[of_firing]
    return latents, activations


def latents_of(
    analysis: PromptAnalysis, model: MLSAETransformer, threshold: float = FIRING_THRESHOLD
) -> PromptLatents:
    """The latents of an analysed prompt (see `PromptLatents`)."""
    values, counted = analysis.values.float(), analysis.counted
    max_activation = values.max(-1).values.masked_fill(~counted[None], float("nan"))
    latents, activations = firing_latents(values, analysis.indices, threshold)
    token_ids = analysis.token_ids[0].cpu()
    tokenizer = model.transformer.tokenizer
    result = PromptLatents(
        token_ids=token_ids,
        tokens=[
            tokenizer.decode([token], clean_up_tokenization_spaces=False)
            for token in token_ids.tolist()
        ],
        blocks=list(model.layers),
        max_activation=max_activation.cpu(),
        latents=latents.cpu(),
        activations=activations.cpu(),
        counted=counted.cpu(),
        threshold=threshold,
    )
    order = result.layer_mean.argsort(stable=True)
    result.latents, result.activations = result.latents[order], result.activations[order]
    return result


def prompt_latents(
    model: MLSAETransformer,
    prompt: str,
    threshold: float = FIRING_THRESHOLD,
    max_tokens: int | None = None,
) -> PromptLatents:
    """The latents of `model` on `prompt` (see `PromptLatents`). `max_tokens` bounds the
    prompt's tokens (default: the transformer's context length); a `PromptError` says
    what is wrong with a prompt that cannot be analysed."""
    return latents_of(analyse_prompt(model, prompt, max_tokens), model, threshold)


def write_prompt_latents(result: PromptLatents, stem: str | os.PathLike[str]) -> list[Path]:
    """Write `<stem>.json`, `<stem>-max.csv` and `<stem>-latents.csv`; returns the paths."""
    stem = Path(stem)
    json_path = stem.with_name(f"{stem.name}.json")
    with atomic_output(json_path) as partial, open(partial, "w") as file:
        json.dump(result.to_json(), file, indent=1)

    max_path = stem.with_name(f"{stem.name}-max.csv")
    with atomic_output(max_path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["layer", "block", "position", "token", "max_activation"])
        for layer, row in enumerate(result.max_activation.tolist()):
            for position, value in enumerate(row):
                token = result.tokens[position]
                writer.writerow([layer, result.blocks[layer], position, token, value])

    latents_path = stem.with_name(f"{stem.name}-latents.csv")
    with atomic_output(latents_path) as partial, open(partial, "w", newline="") as file:
        columns = ["latent", "layer", "block", "position", "token", "activation"]
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for latent, firings in result.firings().items():
            writer.writerows({"latent": latent, **firing} for firing in firings)
    return [json_path, max_path, latents_path]


def save_prompt_latents(config: HeatmapsConfig) -> Saved[PromptLatents]:
    """Analyse `config.prompt` with the configured model and write the results."""
    model = AnalysedModel.load(config)
    result = prompt_latents(model.source.model, config.prompt, config.threshold)
    stem = model.output_path("prompt", "json").with_suffix("")
    json_path, max_path, latents_path = write_prompt_latents(result, stem)
    return Saved(
        result,
        [
            ("the prompt's latents", json_path),
            ("the largest activation per layer and position", max_path),
            ("every firing", latents_path),
        ],
        [f"{len(result.tokens)} tokens, {len(result.latents)} latents fire"],
    )


def main(args: list[str] | None = None) -> PromptLatents:
    return run_analysis(HeatmapsConfig, save_prompt_latents, args)


if __name__ == "__main__":
    run_command(main)
