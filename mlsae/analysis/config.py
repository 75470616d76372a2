"""What every analysis of a pretrained model shares: its options (which model, which data,
where outputs go) and loading the model. Names of models and outputs are in `mlsae.names`;
running an analysis as a command is `mlsae.analysis.run`."""

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import ClassVar

import torch
from simple_parsing import field

from mlsae.analysis.source import MLSAESource, load_source
from mlsae.cli import DataConfig
from mlsae.names import get_repo_id
from mlsae.utils import get_device

DEFAULT_MODEL_NAME = "EleutherAI/pythia-70m-deduped"


@dataclass
class AnalysisConfig:
    """Options common to the analyses of a pretrained MLSAE."""

    hub_suffix: ClassVar[str | None] = None
    """The suffix of the hub dataset the analysis publishes (`...-<suffix>`, with
    --push_to_hub), or None when it publishes none."""

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
