"""What every analysis of a pretrained model shares: its options (which model, which data,
where outputs go) and loading the model: an MLSAE, or a stack of per-layer SAEs
(`--sae`). Names of models and outputs are in `mlsae.names`; running an analysis as a
command is `mlsae.analysis.run`."""

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import ClassVar

import torch
from simple_parsing import field

from mlsae.analysis.source import MLSAESource, StackSource, load_source, load_stack_source
from mlsae.cli import ConfigError, DataConfig
from mlsae.names import get_repo_id, stack_name
from mlsae.utils import get_device

DEFAULT_MODEL_NAME = "EleutherAI/pythia-70m-deduped"


@dataclass
class AnalysisConfig:
    """Options common to the analyses of a pretrained MLSAE."""

    hub_suffix: ClassVar[str | None] = None
    """The suffix of the hub dataset the analysis publishes (`...-<suffix>`, with
    --push_to_hub), or None when it publishes none."""

    stack_refusal: ClassVar[str | None] = None
    """Why the analysis means nothing for a stack of per-layer SAEs (`--sae`), or None
    when it takes one."""

    data: DataConfig = dataclass_field(default_factory=DataConfig)

    repo_id: str | None = None
    """A pretrained -tfm model: hub id or local folder (default: the published id for
    --model_name, --expansion_factor, -k and --tuned_lens)."""

    model_name: str | None = None
    """The transformer of the published model (default EleutherAI/pythia-70m-deduped);
    with --repo_id, where the transformer's config and tokenizer are loaded from instead
    of the checkpoint's own model_name; with --sae, the transformer the SAEs read."""

    sae: list[str] | None = None
    """A stack of per-layer SAEs to analyse instead of an MLSAE, with --model_name: local
    paths or hub ids, one per layer, or one pattern with {layer} in place of the block
    index (e.g. 'saes/layer_{layer}'), in any format that mlsae.saes loads."""

    layers: list[int] | None = None
    """The layers to expand a --sae pattern over (default: the local files and folders
    that match it; SAEs on the hub need it)."""

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

    def check_model_options(self) -> None:
        """A `ConfigError` for options that cannot go together: --sae with --repo_id, or
        without --model_name, --layers without --sae, and --sae for an analysis that means
        nothing for a stack of per-layer SAEs."""
        if not self.sae:
            if self.layers is not None:
                raise ConfigError("--layers expands a --sae pattern; an MLSAE has its own layers")
            return
        if self.repo_id is not None:
            raise ConfigError("--sae and --repo_id each name what to analyse: pass one of them")
        if self.model_name is None:
            raise ConfigError(
                "--sae needs --model_name, the transformer the SAEs read (hub id or local folder)"
            )
        if self.stack_refusal is not None:
            raise ConfigError(f"--sae: {self.stack_refusal}")
        if self.tuned_lens:
            raise ConfigError("--tuned_lens applies to a published MLSAE, not to --sae")
        if getattr(self, "push_to_hub", False):
            raise ConfigError(
                "--push_to_hub: the outputs of a stack of per-layer SAEs are not published; "
                "leave the option out (its outputs go to --output_dir)"
            )

    def analysed_name(self) -> str:
        """What is analysed, as outputs record it: the model's id or folder, or the SAEs
        given to --sae (their pattern, else the first of them)."""
        if self.sae:
            return self.sae[0] if len(self.sae) == 1 else " ".join(self.sae)
        return self.resolved_repo_id()

    def output_name(self) -> str:
        """What the outputs are named after (`mlsae.names.cache_path`): the model, or a
        stack's pattern or first SAE (`mlsae.names.stack_name`)."""
        return stack_name(self.sae[0]) if self.sae else self.resolved_repo_id()

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

    def load_source(self) -> MLSAESource | StackSource:
        """The pretrained model, or the stack of --sae, on --device, as a `LatentSource`."""
        self.check_model_options()
        if self.sae:
            assert self.model_name is not None
            return load_stack_source(
                self.sae,
                self.model_name,
                self.layers,
                torch.device(self.device) if self.device else get_device(),
                count_special_tokens=self.count_special_tokens,
            )
        model_name = self.model_name if self.repo_id is not None else None
        return load_source(
            self.resolved_repo_id(),
            torch.device(self.device) if self.device else get_device(),
            count_special_tokens=self.count_special_tokens,
            model_name=model_name,
        )
