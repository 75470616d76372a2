"""Mean max cosine similarity (MMCS) of decoder columns: `python -m mlsae.analysis.mmcs`.

For every latent, the largest cosine similarity between its decoder column and any OTHER
column of the same decoder (or any column of a second decoder, to compare two models),
and the latent it is reached at; MMCS is the mean over latents. Exact for any width:
the similarities are computed for a chunk of columns against all columns at a time, so
no `n_latents x n_latents` matrix is ever held. (The original compared each latent only
with earlier latents, and its chunked mask was wrong above 16,384 latents.)

With one `--repo_id`, each model is compared with itself; with two, each model with
itself and each with the other as well. Outputs, in `--output_dir` (default `out/`):
`mmcs.csv` (one row per comparison: mean, var, std, sem over latents) and, per
comparison, `<name>[-vs-<other>]-mmcs.csv` (latent, max_cos_sim, partner).
"""

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import safe_open
from simple_parsing import field
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.config import DEFAULT_MODEL_NAME
from mlsae.analysis.run import Saved, run_analysis
from mlsae.cli import ConfigError, run_command
from mlsae.files import atomic_output
from mlsae.lm.hub_access import hub_file, require_local
from mlsae.names import derived_name, get_repo_id
from mlsae.utils import get_device

DECODER_KEYS = ("autoencoder.decoder.weight", "decoder.weight")

# Elements of one chunk of similarities, by default (256 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**26

SUMMARY_COLUMNS = ("repo_id", "other_repo_id", "n_latents", "mean", "var", "std", "sem")


@dataclass
class MMCSConfig:
    """The mean max cosine similarity of the decoder columns of pretrained MLSAEs."""

    repo_id: list[str] | None = None
    """One or two pretrained models (hub ids or local folders; -tfm or plain autoencoder).
    With two, they are also compared with each other (default: the published id for
    --model_name, --expansion_factor, -k and --tuned_lens)."""

    model_name: str = DEFAULT_MODEL_NAME
    """The transformer of the published model."""

    expansion_factor: int = 64
    """The expansion factor of the published model."""

    k: int = field(default=32, alias="-k")
    """k of the published model."""

    tuned_lens: bool = False
    """Use the published -lens model."""

    chunk_size: int | None = None
    """Decoder columns per chunk (default: as many as keep a chunk of similarities at
    2**26 elements)."""

    output_dir: str = "out"
    """Where the CSV files go."""

    device: str | None = None
    """The device to run on (default: CUDA when available, otherwise the CPU)."""

    seed: int = 42
    """The seed of every random number generator."""

    def repo_ids(self) -> list[str]:
        if self.repo_id:
            if len(self.repo_id) > 2:
                raise ConfigError(f"give one or two --repo_id, got {len(self.repo_id)}")
            return list(self.repo_id)
        return [
            get_repo_id(self.model_name, self.expansion_factor, self.k, tuned_lens=self.tuned_lens)
        ]


class MaxCosSim(NamedTuple):
    """Per latent, its largest cosine similarity with another column and that column."""

    values: Float[Tensor, " latent"]
    partners: Int[Tensor, " latent"]


@torch.no_grad()
def max_cos_sim(
    decoder: Float[Tensor, "d_model latent"],
    other: Float[Tensor, "d_model other_latent"] | None = None,
    chunk_size: int | None = None,
) -> MaxCosSim:
    """For each column of `decoder`, the largest cosine similarity with any other of its
    columns (or, given `other`, with any column of `other`) and the index of that column.

    Computed on the decoder's device, `chunk_size` columns at a time against all columns
    (default: `2**26` similarities per chunk). Zero columns have similarity 0 with all.
    """
    columns = F.normalize(decoder.float(), dim=0)
    candidates = columns if other is None else F.normalize(other.to(columns).float(), dim=0)
    if candidates.shape[0] != columns.shape[0]:
        raise ValueError(
            f"the decoders have different widths: {columns.shape[0]} and {candidates.shape[0]}"
        )
    n_latents, n_candidates = columns.shape[1], candidates.shape[1]
    if other is None and n_latents < 2:
        raise ValueError("a decoder with fewer than 2 columns has no other column")
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // n_candidates)
    values = torch.empty(n_latents, device=columns.device)
    partners = torch.empty(n_latents, dtype=torch.int64, device=columns.device)
    starts = range(0, n_latents, chunk_size)
    for start in tqdm(starts, desc="mmcs", unit="chunk", disable=len(starts) < 2):
        stop = min(start + chunk_size, n_latents)
        similarities = columns[:, start:stop].T @ candidates
        if other is None:
            rows = torch.arange(stop - start, device=columns.device)
            similarities[rows, rows + start] = float("-inf")
        values[start:stop], partners[start:stop] = similarities.max(dim=1)
    return MaxCosSim(values, partners)


def mmcs(
    decoder: Float[Tensor, "d_model latent"],
    other: Float[Tensor, "d_model other_latent"] | None = None,
    chunk_size: int | None = None,
) -> float:
    """The mean over latents of `max_cos_sim`."""
    return float(max_cos_sim(decoder, other, chunk_size).values.mean())


def load_decoder(
    repo_id: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> Float[Tensor, "d_model latent"]:
    """The decoder weight of a pretrained model, `-tfm` or plain autoencoder (hub id or local
    folder), read alone from its safetensors file."""
    repo_id = str(repo_id)
    require_local(repo_id, "the model folder")
    if os.path.isdir(os.path.expanduser(repo_id)):
        path = os.path.join(os.path.expanduser(repo_id), "model.safetensors")
    else:
        path = hub_file(repo_id, "model.safetensors", "the MLSAE")
    with safe_open(path, framework="pt", device="cpu") as file:
        for key in DECODER_KEYS:
            if key in file.keys():
                return file.get_tensor(key).to(device)
    raise KeyError(f"{path} holds none of {', '.join(DECODER_KEYS)}")


def summary_row(repo_id: str, other_repo_id: str | None, result: MaxCosSim) -> dict[str, Any]:
    values = result.values.double()
    std = float(values.std())
    return {
        "repo_id": repo_id,
        "other_repo_id": other_repo_id or "",
        "n_latents": len(values),
        "mean": float(values.mean()),
        "var": float(values.var()),
        "std": std,
        "sem": std / len(values) ** 0.5,
    }


def write_latents(result: MaxCosSim, path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["latent", "max_cos_sim", "partner"])
        rows = zip(result.values.tolist(), result.partners.tolist(), strict=True)
        writer.writerows((latent, value, partner) for latent, (value, partner) in enumerate(rows))


def _short_name(repo_id: str) -> str:
    return derived_name(repo_id, "mmcs").replace("/", "-").removesuffix("-mmcs")


def save_mmcs(config: MMCSConfig) -> Saved[list[dict[str, Any]]]:
    """Compute the MMCS of the configured models and write the CSV files."""
    device = torch.device(config.device) if config.device else get_device()
    repo_ids = config.repo_ids()
    decoders = {repo_id: load_decoder(repo_id, device) for repo_id in repo_ids}
    comparisons: list[tuple[str, str | None]] = [(repo_id, None) for repo_id in repo_ids]
    if len(repo_ids) == 2:
        comparisons += [(repo_ids[0], repo_ids[1]), (repo_ids[1], repo_ids[0])]

    output_dir = Path(config.output_dir)
    rows, notes, outputs = [], [], []
    for repo_id, other_repo_id in comparisons:
        other = None if other_repo_id is None else decoders[other_repo_id]
        result = max_cos_sim(decoders[repo_id], other, config.chunk_size)
        rows.append(summary_row(repo_id, other_repo_id, result))
        name = _short_name(repo_id)
        if other_repo_id is not None:
            name += f"-vs-{_short_name(other_repo_id)}"
        path = output_dir / f"{name}-mmcs.csv"
        write_latents(result, path)
        versus = f" vs {other_repo_id}" if other_repo_id else ""
        notes.append(f"MMCS of {repo_id}{versus}: {rows[-1]['mean']:.4f}")
        outputs.append((f"the max cosine similarities of {repo_id}{versus}", path))

    summary_path = output_dir / "mmcs.csv"
    with atomic_output(summary_path) as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return Saved(rows, [*outputs, ("the summary", summary_path)], notes)


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    return run_analysis(MMCSConfig, save_mmcs, args)


if __name__ == "__main__":
    run_command(main)
