"""What every analysis command shares: which model, which data, where outputs go."""

import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
from simple_parsing import field
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from mlsae.analysis.source import MLSAESource, load_source
from mlsae.model.data import get_test_dataloader, get_train_dataloader
from mlsae.trainer.config import DataConfig, require_local_data
from mlsae.utils import get_device, get_repo_id, local_model_name

DEFAULT_MODEL_NAME = "EleutherAI/pythia-70m-deduped"


@dataclass
class AnalysisConfig:
    """Options common to the analyses of a pretrained MLSAE."""

    data: DataConfig = dataclass_field(default_factory=DataConfig)

    repo_id: str | None = None
    """A pretrained -tfm model: hub id or local folder (default: the published id for
    --model_name, --expansion_factor, -k and --tuned_lens)."""

    model_name: str | None = None
    """The transformer of the published model (default EleutherAI/pythia-70m-deduped);
    with --repo_id, where the transformer's config and tokenizer are loaded from instead
    of the checkpoint's own model_name."""

    expansion_factor: int = 64
    """The expansion factor of the published model."""

    k: int = field(default=32, alias="-k")
    """k of the published model."""

    tuned_lens: bool = False
    """Analyse the published -lens model."""

    count_special_tokens: bool = False
    """Count the zeroed special-token positions (BOS/EOS/PAD), as the original did;
    needed to reproduce the published numbers."""

    output_dir: str = "out"
    """Where the outputs go."""

    push_to_hub: bool = False
    """Push the result to the hub as a dataset."""

    device: str | None = None
    """The device to run on (default: CUDA when available, otherwise the CPU)."""

    seed: int = 42
    """The seed of every random number generator."""

    def resolved_repo_id(self) -> str:
        """The model to analyse: --repo_id, or the published id for the options."""
        if self.repo_id is not None:
            return self.repo_id
        return get_repo_id(
            self.model_name or DEFAULT_MODEL_NAME,
            self.expansion_factor,
            self.k,
            tuned_lens=self.tuned_lens,
        )

    def load_source(self) -> MLSAESource:
        """The pretrained model, on --device, as a `LatentSource`."""
        model_name = self.model_name if self.repo_id is not None else None
        return load_source(
            self.resolved_repo_id(),
            torch.device(self.device) if self.device else get_device(),
            count_special_tokens=self.count_special_tokens,
            model_name=model_name,
        )


def derived_name(repo_id: str, suffix: str) -> str:
    """The hub id of a model's analysis dataset: `...-tfm` becomes `...-<suffix>`.

    A local folder gives its name (`path/to/mlsae-x-tfm` -> `mlsae-x-<suffix>`; a model
    that train.py saved to `out/runs/<run>/model` -> `<run>-<suffix>`).
    """
    repo_id = repo_id.rstrip("/")
    if os.path.isdir(repo_id):
        repo_id = local_model_name(repo_id)
    if repo_id.endswith(f"-{suffix}"):
        return repo_id
    if repo_id.endswith("-tfm"):
        repo_id = repo_id[: -len("-tfm")]
    return f"{repo_id}-{suffix}"


def cache_path(repo_id: str, suffix: str, extension: str, output_dir: str = "out") -> Path:
    """The local cache of an analysis, `<output_dir>/<owner>-<name>-<suffix>.<extension>`,
    as the original names it."""
    return Path(output_dir) / f"{derived_name(repo_id, suffix).replace('/', '-')}.{extension}"


def held_out_batches(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> DataLoader:
    """The test stream of `config` (from its first block), `max_steps` batches."""
    require_local_data(config.path)
    return get_test_dataloader(
        tokenizer,
        config.max_length,
        config.batch_size,
        path=config.path,
        max_tokens=config.max_tokens,
        split=config.split,
        text_column=config.text_column,
        num_workers=config.num_workers,
        skip_bad_documents=config.skip_bad_documents,
    )


def training_batches(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> DataLoader:
    """The training stream of `config` (from its first block), `max_steps` batches."""
    require_local_data(config.path)
    return get_train_dataloader(
        config.path,
        tokenizer,
        config.max_length,
        config.batch_size,
        max_tokens=config.max_tokens,
        split=config.split,
        text_column=config.text_column,
        num_workers=config.num_workers,
        skip_bad_documents=config.skip_bad_documents,
    )
