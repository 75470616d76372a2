"""Where the dists figures get each model's dists: a dists file, the cache that
mlsae.analysis.dists writes, the published `-dists` dataset on the hub, or computed on the
data options. Each way that cannot work says so in one line, without waiting on the hub."""

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError

from figures.common import ModelSpec, SweepConfig, describe_error, one_line
from mlsae.analysis.dists import Dists, DistsConfig, save_dists
from mlsae.analysis.run import save_and_report
from mlsae.cli import ConfigError, DataConfig, UserError, require_local_data
from mlsae.lm.hub_access import (
    HubUnreachableError,
    is_local,
    missing_path,
    offline_reason,
    require_hub_id,
    require_local,
)
from mlsae.names import cache_path

DistsSource = Literal["auto", "compute", "hub"]

DISTS_FILE_SUFFIXES = (".safetensors", ".jsonl", ".json", ".parquet", ".csv", ".zst", ".gz")
"""The endings of the dists files that `Dists.load` reads: a name with one is never a hub id."""


@dataclass
class DistsSweepConfig(SweepConfig):
    """A sweep whose figures need the dists of each model (the data options are used only
    to compute missing dists)."""

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    analysis_dir: str = "out"
    """Where mlsae.analysis.dists caches dists: read from there, and written there when
    computed."""

    dists_source: DistsSource = "auto"
    """Where dists missing from --analysis_dir come from: `compute` them with
    mlsae.analysis.dists on the data options (and cache them in --analysis_dir), download
    the published `-dists` dataset from the `hub`, or `auto`: compute for a local model
    folder, download for a hub id."""

    recompute: bool = False
    """Compute the dists even when --analysis_dir has them."""

    count_special_tokens: bool = False
    """When computing dists, count the zeroed special-token positions (as the original)."""


def dists_command(spec: ModelSpec, analysis_dir: str) -> str:
    transformer = f" --model_name {spec.transformer}" if spec.transformer else ""
    return (
        f"python -m mlsae.analysis.dists --repo_id {spec.repo_id}{transformer} --output_dir "
        f"{analysis_dir} --path <data> --split <split> --max_length <n> --batch_size <n> "
        "--max_tokens <n>"
    )


def load_dists(config: DistsSweepConfig, spec: ModelSpec) -> Dists:
    """The dists of one model: the file --repo_id names, the cache in --analysis_dir, or
    (see --dists_source) computed or downloaded."""
    path = Path(spec.repo_id)
    if path.is_file() or (path.is_dir() and not (path / "config.json").exists()):
        return read_dists_file(spec.repo_id, config.torch_device())
    if path.suffix in DISTS_FILE_SUFFIXES:
        raise missing_path(spec.repo_id, "the dists file")
    cached = cache_path(spec.repo_id, "dists", "safetensors", config.analysis_dir)
    if cached.exists() and not config.recompute:
        print(f"Dists of {spec.repo_id}: {cached}")
        return read_cached_dists(cached, config.torch_device())

    require_local(spec.repo_id, "the model folder")
    source = config.dists_source
    if source == "auto":
        source = "compute" if path.is_dir() else "hub"
    if source == "hub":
        return download_dists(config, spec, cached)
    return compute_dists(config, spec)


def read_dists_file(path: str, device: torch.device) -> Dists:
    """The dists in the file or data folder `path`."""
    try:
        return Dists.load(path, device)
    except (SafetensorError, KeyError) as error:
        raise UserError(
            f"cannot read dists from {path} ({describe_error(error)}): pass a file that "
            "mlsae.analysis.dists wrote, or the folder of a pretrained model"
        ) from error


def read_cached_dists(cached: Path, device: torch.device) -> Dists:
    try:
        return Dists.from_file(cached, device)
    except (SafetensorError, KeyError) as error:
        raise UserError(
            f"cannot read the cached dists {cached} ({describe_error(error)}): delete it or pass "
            "--recompute"
        ) from error


def download_dists(config: DistsSweepConfig, spec: ModelSpec, cached: Path) -> Dists:
    """The published dists of the hub model `spec.repo_id`; at once an error that says how
    to compute them where the hub cannot be used."""
    if is_local(spec.repo_id):
        raise ConfigError(
            f"--dists_source hub: {spec.repo_id} is a local folder, whose dists are not on the "
            "hub; pass --dists_source compute with the data options (--path, --split, "
            "--max_tokens)"
        )
    require_hub_id(spec.repo_id, "the model")
    remedy = (
        f"compute them with `{dists_command(spec, config.analysis_dir)}`, or pass "
        "--dists_source compute with those data options"
    )
    reason = offline_reason()
    if reason is not None:
        raise HubUnreachableError(
            f"cannot download the published dists of {spec.repo_id}: {reason}; {remedy}"
        )
    try:
        return Dists.from_hub(spec.repo_id, config.torch_device())
    except (OSError, ValueError) as error:  # Not on the hub, no connection, not dists.
        raise UserError(
            f"{cached} does not exist and the published dists of {spec.repo_id} could not be "
            f"downloaded ({describe_error(error)}); {remedy}"
        ) from error


def compute_dists(config: DistsSweepConfig, spec: ModelSpec) -> Dists:
    """The dists of the model folder `spec.repo_id` on the data options, cached in
    --analysis_dir."""
    try:
        require_local_data(config.data.path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            one_line(
                f"cannot compute the dists of {spec.repo_id}: {error} Or compute them first "
                f"with `{dists_command(spec, config.analysis_dir)}`"
            )
        ) from error
    dists_config = DistsConfig(
        data=config.data,
        repo_id=spec.repo_id,
        model_name=spec.transformer,
        count_special_tokens=config.count_special_tokens,
        output_dir=config.analysis_dir,
        device=config.device,
        seed=config.seed,
    )
    return save_and_report(dists_config, save_dists)
