"""The distribution of every latent over layers: `python -m mlsae.analysis.dists`.

Streams text through a pretrained MLSAE and accumulates, per layer and latent, how many
tokens selected the latent among their top k (`counts`) and the sum of those values
(`totals`; pre-ReLU, as published). `Dists` derives the per-latent statistics of the
published `-dists` datasets from those two tensors. The layer statistics take the index
into the model's stack of layers (0 .. n_layers - 1) as the layer.

Outputs, in `--output_dir` (default `out/`): `<owner>-<name>-dists.safetensors` (the two
tensors, and in its metadata the identity of the model that wrote them), with
`--log_every_n_steps` a CSV of the mean layer std over latents as tokens accumulate, and
with `--push_to_hub` the `-dists` dataset.

Unlike the original, special-token positions are left out unless
`--count_special_tokens`, and exactly `max_tokens // (batch_size * max_length)` batches
are processed (the original processed two more).

For a stack of per-layer SAEs (`--sae`), `counts[l, i]` is how often layer `l`'s own SAE
fired its latent `i` and `totals[l, i]` the sum of those activations (after the SAE's
activation function): each SAE's firing frequencies. Latent `i` of one layer is unrelated
to latent `i` of another, so the per-latent statistics over layers mean nothing there.
"""

import csv
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.config import AnalysisConfig
from mlsae.analysis.identity import (
    OutputOrigin,
    check_origin,
    read_safetensors_origin,
    resolve_identity,
)
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.analysis.source import LatentBatch, LatentSource
from mlsae.cli import DataConfig, run_command
from mlsae.files import atomic_output
from mlsae.lm.documents import load_local_dataset
from mlsae.metrics.layers import layer_distribution, layer_mean, layer_variance
from mlsae.names import cache_path, derived_name

LAYER_STD_COLUMNS = (
    *("model_name", "n_layers", "n_latents", "expansion_factor", "k"),  # the model
    *("step", "tokens", "mean", "var", "std", "sem"),  # the layer std so far
)

_DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DistsConfig(AnalysisConfig):
    """Compute the distribution of every latent of a pretrained MLSAE over layers."""

    hub_suffix: ClassVar[str | None] = "dists"

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    log_every_n_steps: int | None = None
    """Batches between rows of the layer-std CSV (none: no CSV)."""


TOKENS_METADATA = "mlsae.tokens"
"""The safetensors metadata key of the number of token positions counted."""


class Dists:
    """Per-latent statistics of the distribution over layers, from `counts` and `totals`.

    Tensors are `[layer, latent]`; per-latent statistics are `[latent]`. Latents that
    never fired have NaN `probs` and layer statistics (0 / 0), as published. The layer
    statistics are those of `mlsae.metrics.layers` over the pre-ReLU `totals`.
    """

    def __init__(
        self,
        tensors: dict[str, Tensor],
        device: torch.device | str = "cpu",
        tokens: int | None = None,
    ) -> None:
        self.tokens = tokens
        """The number of token positions counted (None when not recorded, as in the
        published datasets)."""
        self.counts: Float[Tensor, "layer latent"] = tensors["counts"].to(device, torch.float32)
        self.totals: Float[Tensor, "layer latent"] = tensors["totals"].to(device, torch.float32)
        if self.counts.shape != self.totals.shape or self.counts.ndim != 2:
            raise ValueError(
                f"counts and totals must both be [layer, latent], got "
                f"{tuple(self.counts.shape)} and {tuple(self.totals.shape)}"
            )
        self.n_layers, self.n_latents = self.counts.shape

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "totals": self.totals}

    @cached_property
    def count(self) -> Float[Tensor, " latent"]:
        return self.counts.sum(0)

    @cached_property
    def total(self) -> Float[Tensor, " latent"]:
        return self.totals.sum(0)

    @cached_property
    def mean(self) -> Float[Tensor, " latent"]:
        return self.total / (self.count + 1e-8)

    @cached_property
    def means(self) -> Float[Tensor, "layer latent"]:
        return self.totals / (self.counts + 1e-8)

    @cached_property
    def probs(self) -> Float[Tensor, "layer latent"]:
        """The distribution over layers, from the pre-ReLU totals (as published)."""
        return layer_distribution(self.totals)

    @cached_property
    def layer_mean(self) -> Float[Tensor, " latent"]:
        return layer_mean(self.totals)

    @cached_property
    def layer_var(self) -> Float[Tensor, " latent"]:
        """E[l^2] - E[l]^2, as published (slightly negative for some one-layer latents)."""
        return layer_variance(self.totals, centred=False)

    @cached_property
    def layer_std(self) -> Float[Tensor, " latent"]:
        return self.layer_var.sqrt()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One row per latent, with the columns of a published `-dists` dataset."""
        per_latent = {
            name: getattr(self, name).tolist()
            for name in ("count", "total", "mean", "layer_mean", "layer_var", "layer_std")
        }
        per_layer = {
            name: getattr(self, name).T.tolist() for name in ("counts", "totals", "means", "probs")
        }
        for latent in range(self.n_latents):
            yield {
                "latent": latent,
                **{name: values[latent] for name, values in per_latent.items()},
                **{name: values[latent] for name, values in per_layer.items()},
            }

    def __len__(self) -> int:
        return self.n_latents

    def save(self, path: str | os.PathLike[str], origin: OutputOrigin | None = None) -> None:
        """Write `counts` and `totals` to a safetensors file (written aside, then moved),
        with `origin` (what wrote them) in its metadata."""
        tensors = {name: tensor.contiguous().cpu() for name, tensor in self.tensors.items()}
        metadata = origin.to_metadata() if origin is not None else {}
        if self.tokens is not None:
            metadata[TOKENS_METADATA] = str(self.tokens)
        with atomic_output(path, f"the dists {Path(path).name}") as partial:
            save_file(tensors, partial, metadata=metadata or None)

    def to_dataset(self) -> datasets.Dataset:
        """The rows as a `-dists` dataset."""
        return datasets.Dataset.from_list(list(self))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> None:
        """Push the rows to the hub as the dataset `repo_id` (e.g. `...-dists`)."""
        self.to_dataset().push_to_hub(repo_id, **kwargs)

    @staticmethod
    def from_file(
        path: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        model: Any = None,
        dataset_id: str | None = None,
    ) -> "Dists":
        """From a safetensors file with `counts` and `totals`. Given `model` (an
        `MLSAETransformer` or its `model_identity`), refuse a file of another model (see
        `mlsae.analysis.identity.check_origin`; `dataset_id`: the model's `-dists`)."""
        if model is not None:
            check_origin(
                path,
                read_safetensors_origin(path),
                resolve_identity(model),
                dataset_id=dataset_id,
                rerun="run `python -m mlsae.analysis.dists` for this model",
            )
        with safe_open(path, "pt") as file:
            tokens = (file.metadata() or {}).get(TOKENS_METADATA)
        return Dists(load_file(path), device, int(tokens) if tokens else None)

    @staticmethod
    def from_dataset(
        dataset: datasets.Dataset | datasets.DatasetDict, device: torch.device | str = "cpu"
    ) -> "Dists":
        """From the rows of a `-dists` dataset (any row order)."""
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        columns = dataset.select_columns(["latent", "counts", "totals"]).to_dict()
        order = np.argsort(np.asarray(columns["latent"]), kind="stable")
        counts = torch.tensor(columns["counts"], dtype=torch.float32)[order].T
        totals = torch.tensor(columns["totals"], dtype=torch.float32)[order].T
        return Dists({"counts": counts, "totals": totals}, device)

    @staticmethod
    def from_hub(repo_id: str, device: torch.device | str = "cpu") -> "Dists":
        """From the hub dataset `repo_id` (`...-tfm` and model ids map to `...-dists`)."""
        return Dists.from_dataset(
            datasets.load_dataset(derived_name(repo_id, "dists"), split="train"), device
        )

    @staticmethod
    def load(
        repo_id: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        output_dir: str | os.PathLike[str] = "out",
        model: Any = None,
    ) -> "Dists":
        """Load the dists of a model, trying in turn:

        1. `repo_id` as a local file: `.safetensors` (tensors) or `.jsonl`, `.json`,
           `.parquet`, `.csv` (rows);
        2. `repo_id` as a local folder holding a dataset (`save_to_disk`) or data files;
        3. the local cache `<output_dir>/<owner>-<name>-dists.safetensors` of the model
           `repo_id` (hub id or local model folder);
        4. the hub dataset `<owner>/<name>-dists`.

        Given `model` (an `MLSAETransformer` or its `model_identity`), a safetensors file
        that another model wrote is refused with an `OutputOfAnotherModelError`.
        """
        path = Path(repo_id)
        if path.is_file():
            if path.suffix == ".safetensors":
                return Dists.from_file(path, device, model)
            return Dists.from_dataset(_load_rows_file(path), device)
        if path.is_dir() and not (path / "config.json").exists():
            return Dists.from_dataset(_load_rows_folder(path), device)
        cached = cache_path(str(repo_id), "dists", "safetensors", output_dir)
        if cached.exists():
            return Dists.from_file(cached, device, model, derived_name(str(repo_id), "dists"))
        return Dists.from_hub(str(repo_id), device)


def _load_rows_file(path: Path) -> datasets.Dataset:
    name = path.name.removesuffix(".zst").removesuffix(".gz")
    builder = _DATA_EXTENSIONS.get(Path(name).suffix)
    if builder is None:
        raise ValueError(f"cannot read dists from {path}: expected .safetensors or rows")
    return load_local_dataset(builder, data_files=str(path), split="train")


def _load_rows_folder(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        return datasets.load_from_disk(str(path))
    return load_local_dataset(str(path), split="train")


class DistsAccumulator:
    """Streaming `counts` and `totals` per layer and latent, on the device of the latents.

    Every top-k entry counts, whatever its value (pre-ReLU, as published), except at
    positions outside the batch's mask and the padding of a stack (`selected`).
    """

    def __init__(self, n_layers: int, n_latents: int) -> None:
        self.n_layers = n_layers
        self.n_latents = n_latents
        self.counts: Int[Tensor, "layer latent"] | None = None
        self.totals: Float[Tensor, "layer latent"] | None = None
        self.tokens = 0
        """Token positions that counted so far."""

    def update(self, batch: LatentBatch) -> None:
        values, indices = batch.topk
        device = indices.device
        if self.counts is None or self.totals is None:
            shape = (self.n_layers, self.n_latents)
            self.counts = torch.zeros(shape, dtype=torch.int64, device=device)
            self.totals = torch.zeros(shape, dtype=torch.float32, device=device)
        ones = torch.ones_like(indices) if batch.selected is None else batch.selected.to(device)
        if batch.mask is not None:
            mask = batch.mask.to(device)
            values, indices, ones = values[:, mask], indices[:, mask], ones[:, mask]
            self.tokens += int(mask.sum())
        else:
            self.tokens += indices[0, ..., 0].numel()
        indices = indices.reshape(self.n_layers, -1)
        self.counts.scatter_add_(1, indices, ones.reshape(self.n_layers, -1).long())
        self.totals.scatter_add_(1, indices, values.reshape(self.n_layers, -1).float())

    def dists(self) -> Dists:
        if self.counts is None or self.totals is None:
            raise ValueError("no batches were accumulated")
        tensors = {"counts": self.counts, "totals": self.totals}
        return Dists(tensors, self.totals.device, self.tokens)


def layer_std_stats(layer_std: Float[Tensor, " latent"]) -> dict[str, float]:
    """NaN-aware statistics over latents of the layer std; `sem` divides by the square
    root of the number of latents, NaNs included (as the original did)."""
    values = layer_std.float().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        std = float(np.nanstd(values))
        return {
            "mean": float(np.nanmean(values)),
            "var": float(np.nanvar(values)),
            "std": std,
            "sem": std / float(np.sqrt(len(values))),
        }


def describe_source(source: LatentSource) -> dict[str, Any]:
    """The model columns of the layer-std CSV (None where the source cannot say)."""
    model = getattr(source, "model", source)
    return {
        "model_name": getattr(model, "model_name", None),
        "n_layers": source.n_layers,
        "n_latents": source.n_latents,
        "expansion_factor": getattr(model, "expansion_factor", None),
        "k": getattr(model, "k", None),
    }


@torch.no_grad()
def collect_dists(
    source: LatentSource,
    batches: Iterable[dict[str, Tensor]],
    *,
    total: int | None = None,
    log_every_n_steps: int | None = None,
) -> tuple[Dists, list[dict[str, Any]]]:
    """Accumulate the dists of `source` over every batch of `batches`.

    Returns the dists and, with `log_every_n_steps`, one layer-std row (the columns of
    `LAYER_STD_COLUMNS`) per `log_every_n_steps` batches, from the first batch on;
    `tokens` counts the positions that counted so far.
    """
    accumulator = DistsAccumulator(source.n_layers, source.n_latents)
    model_columns = describe_source(source)
    rows: list[dict[str, Any]] = []
    for step, batch in enumerate(tqdm(batches, total=total, desc="dists", unit="batch")):
        accumulator.update(source.latents(batch["input_ids"]))
        if log_every_n_steps and step % log_every_n_steps == 0:
            stats = layer_std_stats(accumulator.dists().layer_std)
            rows.append({**model_columns, "step": step, "tokens": accumulator.tokens, **stats})
    return accumulator.dists(), rows


def write_layer_std_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    with atomic_output(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LAYER_STD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def save_dists(config: DistsConfig) -> Saved[Dists]:
    """Compute the dists of the configured model and write them to `config.output_dir`."""
    model = AnalysedModel.load(config)
    dists, rows = collect_dists(
        model.source,
        model.batches(),
        total=model.max_steps,
        log_every_n_steps=config.log_every_n_steps,
    )
    path = model.output_path("dists", "safetensors")
    notes = model.replacement_notes(path, read_safetensors_origin(path))
    dists.save(path, model.origin)
    outputs = [(f"the dists of {model.repo_id}", path)]
    if rows:
        csv_path = Path(config.output_dir) / f"dists_layer_std_step_{path.stem}.csv"
        write_layer_std_csv(rows, csv_path)
        outputs.append((f"the layer std every {config.log_every_n_steps} steps", csv_path))
    return Saved(dists, outputs, notes, push=dists.push_to_hub, dataset_id=model.dataset_id())


def main(args: list[str] | None = None) -> Dists:
    return run_analysis(DistsConfig, save_dists, args)


if __name__ == "__main__":
    run_command(main)
