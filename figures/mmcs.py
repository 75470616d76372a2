"""Mean max cosine similarity (MMCS) of decoder columns across a sweep:
`python -m figures.mmcs`.

Per model, every latent's largest cosine similarity between its decoder column and any
other column of the same decoder (`mlsae.analysis.mmcs.max_cos_sim`, exact, in chunks);
MMCS is their mean. Close to 1 when latents duplicate one another.

Reads each model's decoder (`model.safetensors` of a local folder or the hub; -tfm or
plain autoencoder). Writes, in --output_dir: `mmcs.csv` (a row per model: n_latents,
mean, var, std, sem over latents), `mmcs.md` and `.tex` (mean ± SEM), `mmcs.png` (the
distribution of each model's max cosine similarities) and `mmcs_<model>.csv` (latent,
max_cos_sim, partner).
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from safetensors import SafetensorError
from torch import Tensor

from figures.common import (
    MODEL_COLUMNS,
    SweepConfig,
    mean_sem_cell,
    new_figure,
    parse_config,
    save_figure,
    value_cell,
    write_tables,
)
from mlsae.analysis.mmcs import load_decoder, max_cos_sim, summary_row, write_latents
from mlsae.cli import ConfigError, UserError, run_command
from mlsae.lm.hub_access import hub_file, require_local

WEIGHTS = "model.safetensors"


@dataclass
class MMCSFigureConfig(SweepConfig):
    """The MMCS of the decoders of the models of a sweep."""

    chunk_size: int | None = None
    """Decoder columns per chunk of similarities (default: 2**26 similarities a chunk)."""


def decoder_folder(repo_id: str) -> str:
    """The local folder with the `model.safetensors` of the model `repo_id` (a folder, or a
    hub id: its copy in the hub cache, downloaded if need be); an error at once for a
    missing folder or file, a file, or a hub model that cannot be had."""
    if os.path.isfile(repo_id):
        raise ConfigError(
            f"{repo_id} is a file: pass the folder that holds the model's {WEIGHTS} and config.json"
        )
    if os.path.isdir(repo_id):
        if not os.path.isfile(os.path.join(repo_id, WEIGHTS)):
            raise UserError(
                f"{repo_id} has no {WEIGHTS}: pass the folder of a pretrained MLSAE "
                "(-tfm or plain autoencoder)"
            )
        return repo_id
    require_local(repo_id, "the model folder")
    return os.path.dirname(hub_file(repo_id, WEIGHTS, "the MLSAE"))


def read_decoder(repo_id: str, device: torch.device) -> Float[Tensor, "d_model latent"]:
    """The decoder weight of the pretrained model `repo_id` (see `decoder_folder`)."""
    folder = decoder_folder(repo_id)
    try:
        return load_decoder(folder, device)
    except KeyError as error:  # A safetensors file without a decoder.
        raise UserError(
            f"{error.args[0]}: pass a pretrained MLSAE (-tfm or plain autoencoder)"
        ) from error
    except SafetensorError as error:
        raise UserError(
            f"cannot read {os.path.join(folder, WEIGHTS)} ({error}): pass the folder of a "
            "pretrained MLSAE (-tfm or plain autoencoder)"
        ) from error


def main(args: Sequence[str] | None = None) -> list[Path]:
    config: MMCSFigureConfig = parse_config(MMCSFigureConfig, args, __doc__)
    output_dir = Path(config.output_dir)
    records: list[dict[str, Any]] = []
    values: list[np.ndarray] = []
    paths = []
    for spec in config.models():
        decoder = read_decoder(spec.repo_id, config.torch_device())
        result = max_cos_sim(decoder, chunk_size=config.chunk_size)
        summary = summary_row(spec.repo_id, None, result)
        records.append(
            {
                **spec.columns(),
                **{key: summary[key] for key in ("n_latents", "mean", "var", "std", "sem")},
            }
        )
        values.append(result.values.cpu().numpy())
        latents_path = output_dir / f"mmcs_{spec.label}.csv"
        write_latents(result, latents_path)
        paths.append(latents_path)
        print(f"MMCS of {spec.repo_id}: {summary['mean']:.4f}")

    columns = [*MODEL_COLUMNS, ("Latents", value_cell("n_latents")), ("MMCS", mean_sem_cell())]
    paths += write_tables(output_dir / "mmcs", records, columns)

    figure = new_figure(4.5, 3)
    axes = figure.subplots()
    bins = np.linspace(min(0.0, *(v.min() for v in values)), 1, 101)
    for record, model_values in zip(records, values, strict=True):
        axes.hist(model_values, bins=bins, histtype="step", label=record["model"])
    axes.set_xlabel("max cosine similarity with another latent")
    axes.set_ylabel("latents")
    axes.legend(fontsize="small")
    paths.append(save_figure(figure, output_dir / "mmcs.png"))
    return paths


if __name__ == "__main__":
    run_command(main)
