"""Which latents fire where on one prompt: `python -m mlsae.analysis.heatmaps --prompt ...`.

For a prompt, `prompt_latents` gives its tokens, the largest latent activation at each
(layer, position) and, for every latent that fires (activation after ReLU above
`--threshold`), its activation at every (layer, position). Layers are indices into the
model's stack (0 .. n_layers - 1; `blocks` maps them to the transformer's blocks).
Special-token positions are left out (NaN maximum, no latent fires there) unless
`--count_special_tokens`.

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
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.analysis.config import AnalysisConfig, cache_path
from mlsae.analysis.source import LatentSource
from mlsae.cli import initialize, parse, run_command
from mlsae.files import atomic_output

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"

# Tokenizers without a real limit report this as their model_max_length.
_UNBOUNDED = 10**12


@dataclass
class HeatmapsConfig(AnalysisConfig):
    """The latents of a pretrained MLSAE on one prompt, at every layer and position.

    The data options are not used: the only text is the prompt."""

    prompt: str = DEFAULT_PROMPT
    """The text to analyse."""

    threshold: float = 1e-3
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
        weights = self.activations.sum(-1)
        layers = torch.arange(weights.shape[1], dtype=weights.dtype, device=weights.device)
        return (weights * layers).sum(-1) / weights.sum(-1)

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


def context_length(source: LatentSource) -> int | None:
    """The most tokens the source's transformer takes at once, if it can tell."""
    model = getattr(source, "model", None)
    transformer = getattr(model, "transformer", None)
    config = getattr(transformer, "config", None)
    if config is not None:
        config = getattr(config, "get_text_config", lambda: config)()
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    model_max_length = getattr(source.tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and model_max_length < _UNBOUNDED:
        return model_max_length
    return None


def tokenize_prompt(
    source: LatentSource, prompt: str, max_length: int | None = None
) -> Int[Tensor, " pos"]:
    """The token ids of `prompt`; a clear error when there are none or too many."""
    if not prompt:
        raise ValueError("the prompt is empty")
    token_ids = source.tokenizer(prompt)["input_ids"]
    if len(token_ids) == 0:
        raise ValueError(f"the prompt {prompt!r} has no tokens")
    max_length = max_length if max_length is not None else context_length(source)
    if max_length is not None and len(token_ids) > max_length:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens, more than the model's context of "
            f"{max_length}; shorten it"
        )
    return torch.tensor(token_ids, dtype=torch.int64)


@torch.no_grad()
def prompt_latents(
    source: LatentSource,
    prompt: str,
    threshold: float = 1e-3,
    max_length: int | None = None,
) -> PromptLatents:
    """The latents of `source` on `prompt` (see `PromptLatents`).

    `max_length` bounds the prompt's tokens (default: the transformer's context)."""
    token_ids = tokenize_prompt(source, prompt, max_length)
    batch = source.latents(token_ids.unsqueeze(0))
    values, indices = batch.topk
    values, indices = values[:, 0].clamp(min=0).float(), indices[:, 0]
    n_layers, n_positions, _ = indices.shape
    counted = torch.ones(n_positions, dtype=torch.bool, device=indices.device)
    if batch.mask is not None:
        counted = batch.mask[0].to(indices.device)
    values = values * counted[None, :, None]

    max_activation = values.max(-1).values.masked_fill(~counted[None], float("nan"))

    fired = values > threshold
    latents = indices[fired].unique()
    # Every selected value of a firing latent, also where it is below the threshold.
    of_firing = torch.isin(indices, latents)
    layer, position, _ = of_firing.nonzero(as_tuple=True)
    row = torch.searchsorted(latents, indices[of_firing])
    activations = torch.zeros(len(latents), n_layers, n_positions, device=values.device)
    activations[row, layer, position] = values[of_firing]

    result = PromptLatents(
        token_ids=token_ids,
        tokens=[
            source.tokenizer.decode([token], clean_up_tokenization_spaces=False)
            for token in token_ids.tolist()
        ],
        blocks=list(source.layers),
        max_activation=max_activation.cpu(),
        latents=latents.cpu(),
        activations=activations.cpu(),
        counted=counted.cpu(),
        threshold=threshold,
    )
    order = result.layer_mean.argsort(stable=True)
    result.latents, result.activations = result.latents[order], result.activations[order]
    return result


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


def save_prompt_latents(config: HeatmapsConfig) -> PromptLatents:
    """Analyse `config.prompt` with the configured model and write the results."""
    repo_id = config.resolved_repo_id()
    source = config.load_source()
    result = prompt_latents(source, config.prompt, config.threshold)
    stem = cache_path(repo_id, "prompt", "json", config.output_dir).with_suffix("")
    paths = write_prompt_latents(result, stem)
    print(
        f"{len(result.tokens)} tokens, {len(result.latents)} latents fire; "
        f"written to {', '.join(map(str, paths))}"
    )
    return result


def main(args: list[str] | None = None) -> PromptLatents:
    config = parse(HeatmapsConfig, args)
    initialize(config.seed)
    return save_prompt_latents(config)


if __name__ == "__main__":
    run_command(main)
