"""Command-line configuration: simple-parsing dataclasses, one docstring per option.

Options are unprefixed (`--expansion_factor`, `-k`, `--path`, ...) as in the
original, so `python train.py --help` lists every one with its default.
"""

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from itertools import product

import torch
from simple_parsing import field

from mlsae.cli import DataConfig, initialize, parse, require_local_data  # noqa: F401 (re-exported)
from mlsae.model.hparams import MLSAEConfig, MLSAEHyperparameters, check_site
from mlsae.utils import get_repo_id

DEFAULT_MODEL_NAME = "EleutherAI/pythia-70m-deduped"
"""The published models' transformer."""

AutoencoderConfig = MLSAEConfig
"""The `train.py` options of the autoencoder (declared in `mlsae.model.hparams`)."""


@dataclass
class TrainDataConfig(DataConfig):
    """Where the text comes from, how it is cut into token blocks, and what is held out."""

    val_path: str | None = None
    """Separate validation data; without it, validation holds out the first
    `val_tokens` tokens of the training stream, which training skips."""

    val_split: str = "validation"
    """The split of `val_path` to validate on."""

    val_tokens: int = 1_048_576
    """Tokens held out for validation."""

    @property
    def val_blocks(self) -> int:
        return max(1, self.val_tokens // self.max_length)


def default_precision() -> str:
    """16-bit mixed precision on CUDA, full precision on the CPU."""
    return "16-mixed" if torch.cuda.is_available() else "32-true"


MOVABLE_OPTIONS = ("path", "val_path", "model_name")
"""Options naming files that may move between a run and its resume (see `--moved`)."""


@dataclass
class TrainerConfig:
    """The Lightning trainer: devices, precision, logging and checkpoints."""

    accumulate_grad_batches: int = 64
    """Micro-batches per optimizer step."""

    precision: str | None = None
    """Lightning precision; default 16-mixed on CUDA, 32-true on the CPU."""

    devices: str = "auto"
    """Devices to train on (Lightning's `devices`: a count, a list such as 0,1, or auto)."""

    accelerator: str = "auto"
    """cpu, gpu, or auto."""

    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, ..."""

    num_nodes: int = 1
    """Machines for multi-node training."""

    max_steps: int | None = None
    """Optimizer steps; default: as many as `max_tokens` gives."""

    log_every_n_steps: int = 8
    """Optimizer steps between logged metrics."""

    val_check_interval: int | None = 4096
    """Micro-batches between validations (micro-batches, as in the original, where the
    other intervals count optimizer steps; none: once per epoch)."""

    limit_val_batches: int = 512
    """Validation batches per validation."""

    checkpoint_every_n_steps: int = 1000
    """Optimizer steps between checkpoints (the last one is always kept)."""

    checkpoint_path: str | None = None
    """A checkpoint (`last.ckpt`) to resume training from, with the options it was trained
    with (a resume with options that change the model or the data is refused)."""

    moved: list[str] = dataclass_field(default_factory=list)
    """On resume: options naming files that moved since the checkpoint was written (path,
    val_path, model_name), whose new values are accepted as the same data or model."""

    run_dir: str = "out/runs"
    """Where runs keep their logs and checkpoints."""

    output_dir: str | None = None
    """Where the trained model is saved with save_pretrained (default: <run>/model)."""

    logger: str = "auto"
    """wandb, csv, tensorboard, none, or auto (wandb when logged in, else csv)."""

    skip_non_finite: bool = False
    """Skip optimizer steps with NaN/inf in the residual stream or loss (with a warning)
    instead of stopping the run with an error naming the layer and step."""


@dataclass
class RunConfig:
    """Train an MLSAE on every layer of a transformer: its residual stream, or another --site."""

    autoencoder: MLSAEConfig = dataclass_field(default_factory=MLSAEConfig)
    data: TrainDataConfig = dataclass_field(default_factory=TrainDataConfig)
    trainer: TrainerConfig = dataclass_field(default_factory=TrainerConfig)

    model_name: str = "EleutherAI/pythia-70m-deduped"
    """A hub id or local folder of a causal LM and its tokenizer."""

    layers: list[int] | None = None
    """The decoder blocks to train on, space-separated: --layers 0 2 5 (omitted: all)."""

    site: str = "resid_post"
    """Where the MLSAE reads each layer: resid_post (the block's output), resid_pre (its
    input), attn_out or mlp_out (what attention or the MLP adds to the residual stream),
    mlp_in (the MLP's normalised input) or attn_z (the heads' outputs entering attention's
    output projection, heads x head_dim wide)."""

    seed: int = 42
    """The seed of every random number generator."""

    project: str | None = None
    """The Weights & Biases project."""

    run: str | None = None
    """The run's name (default: derived from the model and hyperparameters)."""

    def hyperparameters(self) -> MLSAEHyperparameters:
        """The hyperparameters of the model these options train."""
        return MLSAEHyperparameters(
            **asdict(self.autoencoder),
            model_name=self.model_name,
            layers=self.layers,
            site=self.site,
            max_length=self.data.max_length,
            batch_size=self.data.batch_size,
            accumulate_grad_batches=self.trainer.accumulate_grad_batches,
            skip_non_finite=self.trainer.skip_non_finite,
        )


@dataclass
class SweepConfig:
    """The published models of a sweep: every combination of transformer, expansion factor
    and k (the original's `SweepConfig`)."""

    model_name: list[str] = dataclass_field(default_factory=lambda: [DEFAULT_MODEL_NAME])
    """Transformers of the published models, one or more (space-separated)."""

    expansion_factor: list[int] = dataclass_field(default_factory=list)
    """Expansion factors of the published models, one or more: --expansion_factor 32 64."""

    k: list[int] = field(default_factory=list, alias="-k")
    """k of the published models, one or more: -k 16 32."""

    tuned_lens: bool = False
    """The published -lens models."""

    seed: int = 42
    """The seed of every random number generator."""

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        """`(model_name, expansion_factor, k)` of every model of the sweep."""
        yield from product(self.model_name, self.expansion_factor, self.k)

    def repo_ids(self, transformer: bool = True) -> Iterator[str]:
        """The hub ids of the sweep's models (`-tfm` modules unless `transformer=False`)."""
        for model_name, expansion_factor, k in self:
            yield get_repo_id(
                model_name, expansion_factor, k, tuned_lens=self.tuned_lens, transformer=transformer
            )


@dataclass
class TestConfig(SweepConfig):
    """Evaluate pretrained MLSAEs, or a stack of per-layer SAEs (--sae), on held-out text
    and write their metrics to CSV."""

    data: DataConfig = dataclass_field(
        default_factory=lambda: DataConfig(path="data/test.jsonl.zst", split="test")
    )

    expansion_factor: list[int] = dataclass_field(default_factory=lambda: [64])
    """Expansion factors of the published models to evaluate, one or more: --expansion_factor
    32 64."""

    k: list[int] = field(default_factory=lambda: [32], alias="-k")
    """k of the published models to evaluate, one or more: -k 16 32."""

    model_name: list[str] | None = None
    """Transformers of the published models, one or more (default: EleutherAI/pythia-70m-
    deduped); with --repo_id, the one language model to load it with instead of the one it
    was trained on (a hub id or local folder); with --sae, the one transformer the SAEs
    read."""

    repo_id: str | None = None
    """A pretrained -tfm model: hub id or local folder (default: the published id
    for each model name, expansion factor and k)."""

    count_special_tokens: bool = False
    """Count the zeroed special-token positions, as the original did."""

    precision: str | None = None
    """Lightning precision; default 16-mixed on CUDA, 32-true on the CPU."""

    accelerator: str = "auto"
    """cpu, gpu, or auto."""

    output_dir: str = "out"
    """Where the CSV files go."""

    sae: list[str] | None = None
    """A stack of per-layer SAEs to evaluate instead of an MLSAE, with one --model_name
    (the transformer they read): local paths or hub ids, one per layer, or one pattern with
    {layer} in place of the block index (e.g. 'saes/layer_{layer}')."""

    layers: list[int] | None = None
    """The layers to expand a --sae pattern over (default: the local files and folders
    that match it; SAEs on the hub need it)."""

    def check_sae_options(self) -> None:
        """A `ConfigError` for options that cannot go with --sae (or --layers without it)."""
        from mlsae.cli import ConfigError

        if not self.sae:
            if self.layers is not None:
                raise ConfigError("--layers expands a --sae pattern; an MLSAE has its own layers")
            return
        if self.repo_id is not None:
            raise ConfigError("--sae and --repo_id each name what to evaluate: pass one of them")
        if self.model_name is None or len(self.model_name) != 1:
            given = "none" if self.model_name is None else len(self.model_name)
            raise ConfigError(
                "--sae needs one --model_name, the transformer the SAEs read (hub id or local "
                f"folder), got {given}"
            )
        if self.tuned_lens:
            raise ConfigError("--tuned_lens applies to a published MLSAE, not to --sae")
        if self.precision is not None:
            raise ConfigError(
                "--precision applies to an MLSAE; a stack of SAEs runs in float32 (leave "
                "--precision out)"
            )

    def repo_ids(self, transformer: bool = True) -> Iterator[str]:
        """The models to evaluate: `--repo_id`, or the sweep's published models."""
        if self.repo_id is not None:
            yield self.repo_id
            return
        yield from super().repo_ids(transformer)

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        model_names = self.model_name or [DEFAULT_MODEL_NAME]
        yield from product(model_names, self.expansion_factor, self.k)

    def language_model(self) -> str | None:
        """The language model that --model_name names for --repo_id, None to use the stored
        one (without --repo_id, --model_name picks the published models instead)."""
        if self.repo_id is None or self.model_name is None:
            return None
        if len(self.model_name) != 1:
            from mlsae.cli import ConfigError

            raise ConfigError(
                f"with --repo_id, give one --model_name (the language model to load "
                f"{self.repo_id} with), got {len(self.model_name)}"
            )
        return self.model_name[0]

    @classmethod
    def from_run(cls, config: "RunConfig") -> "TestConfig":
        """The evaluation the original's `test(RunConfig)` ran: the published model for the
        run's transformer, expansion factor, k and tuned lens, on the test split."""
        ae, data = config.autoencoder, config.data
        return cls(
            data=DataConfig(
                path="data/test.jsonl.zst",
                split="test",
                max_length=data.max_length,
                batch_size=data.batch_size,
                max_tokens=data.max_tokens,
                num_workers=data.num_workers,
            ),
            model_name=[config.model_name],
            expansion_factor=[ae.expansion_factor],
            k=[ae.k],
            tuned_lens=ae.tuned_lens,
            count_special_tokens=ae.count_special_tokens,
            precision=config.trainer.precision,
            seed=config.seed,
        )


def _require_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    from mlsae.cli import ConfigError

    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"--{name} must be a positive integer, got {value}")


def check_precision(precision: str | None, accelerator: str = "auto") -> None:
    """16-bit mixed precision needs CUDA; say so before Lightning does, less clearly."""
    from mlsae.cli import ConfigError

    on_cpu = accelerator == "cpu" or not torch.cuda.is_available()
    if precision is not None and precision.startswith("16") and on_cpu:
        raise ConfigError(
            f"--precision {precision} needs a CUDA GPU; on the CPU use 32-true or bf16-mixed"
        )


def check_run_config(config: "RunConfig") -> None:
    """Reject options that cannot work, before any model is loaded."""
    from mlsae.cli import ConfigError

    ae, data, trainer = config.autoencoder, config.data, config.trainer
    _require_positive("expansion_factor", ae.expansion_factor)
    _require_positive("k", ae.k)
    _require_positive("auxk", ae.auxk, allow_none=True)
    _require_positive("max_length", data.max_length)
    _require_positive("batch_size", data.batch_size)
    _require_positive("max_tokens", data.max_tokens)
    _require_positive("accumulate_grad_batches", trainer.accumulate_grad_batches)
    _require_positive("max_steps", trainer.max_steps, allow_none=True)
    check_site(config.site, ae.tuned_lens)
    ae.check_architecture()
    if config.layers is not None and len(set(config.layers)) != len(config.layers):
        raise ConfigError(f"--layers must not repeat a layer, got {config.layers}")
    if data.max_tokens < data.batch_size * data.max_length:
        raise ConfigError(
            f"--max_tokens {data.max_tokens} is less than one batch "
            f"({data.batch_size} x {data.max_length} tokens)"
        )
    check_precision(trainer.precision, trainer.accelerator)
    if trainer.moved and trainer.checkpoint_path is None:
        raise ConfigError("--moved applies only when resuming, with --checkpoint_path")
    unknown = [name for name in trainer.moved if name not in MOVABLE_OPTIONS]
    if unknown:
        raise ConfigError(f"--moved takes {', '.join(MOVABLE_OPTIONS)}, not {', '.join(unknown)}")


@dataclass
class UploadConfig:
    """Publish a trained MLSAE: the -tfm LightningModule and the plain autoencoder."""

    ckpt_path: str
    """A Lightning checkpoint written by train.py (e.g. out/runs/<run>/checkpoints/last.ckpt)."""

    repo_id: str | None = None
    """The hub id of the -tfm model (default: the published naming for its hyperparameters);
    the plain autoencoder goes to the same id without -tfm."""

    model_name: str | None = None
    """The hub id (owner/name) of the language model the MLSAE was trained on, which the
    published config names. Required when it was trained on a local folder, which nobody
    else can load (default: the name it was trained with, when that is a hub id)."""

    output_dir: str = "out/upload"
    """Where both layouts are written before they are pushed."""

    private: bool = False
    """Create private hub repositories."""
