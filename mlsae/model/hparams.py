"""The hyperparameters of an MLSAE and its training, declared once.

`MLSAEConfig` holds the autoencoder's own options (the `train.py` group of that name, as in
the original); `MLSAEHyperparameters` adds what the model needs of the transformer, the data
and the trainer. `MLSAETransformer`'s constructor takes exactly these fields (its signature
is built from them), its `config.json` holds them flat, and the command line's options are
the same fields, with these docstrings as their help.
"""

import inspect
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from simple_parsing import field

from mlsae.cli import ConfigError
from mlsae.lm.sites import SITES
from mlsae.metrics import FIRING_THRESHOLD
from mlsae.model.variants import check_variant_options


@dataclass
class MLSAEConfig:
    """The autoencoder and its training objective."""

    expansion_factor: int = 64
    """The number of latents over the transformer's width."""

    k: int = field(default=32, alias="-k")
    """The number of latents kept per vector (TopK)."""

    auxk: int | None = 256
    """How many dead latents model the residual error (AuxK); none to turn it off."""

    auxk_coef: float | None = 1 / 32
    """The weight of the AuxK loss."""

    dead_tokens_threshold: int = 10_000_000
    """Training tokens without firing after which a latent is dead."""

    dead_threshold: float = FIRING_THRESHOLD
    """The activation above which a latent counts as fired."""

    lr: float = 1e-4
    """Adam's learning rate."""

    adam_eps: float = 6.25e-10
    """Adam's epsilon."""

    lr_warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up."""

    lr_decay_steps: int = 0
    """Final optimizer steps of linear learning-rate decay to zero."""

    standardize: bool = True
    """Whether to standardise every residual vector (zero mean, unit variance)."""

    skip_special_tokens: bool = True
    """Whether to zero the residual stream at BOS/EOS/PAD positions."""

    count_special_tokens: bool = False
    """Whether those zeroed positions count in losses, metrics and dead latents
    (the original's behaviour; needed to reproduce its numbers)."""

    tuned_lens: bool = False
    """Whether to translate the residual stream with the model's tuned lens."""

    architecture: str = "topk"
    """topk (k latents per vector), batchtopk (k per vector on average over the micro-batch's
    vectors that count; JumpReLU at a learnt threshold at inference) or matryoshka (the loss
    sums the reconstruction losses of nested prefixes of the latents). docs/variants.md."""

    batchtopk_capacity: int | None = None
    """BatchTopK's candidates per vector, at least k (default: 4 k, at most the latents): exact
    whenever no vector keeps all its candidates (logged as train/batchtopk/capped)."""

    batchtopk_pool: str = "stack"
    """Where BatchTopK keeps k per vector on average: stack (one pool over every layer's
    vectors, as one SAE sees them all) or layer (one pool per layer)."""

    matryoshka_widths: list[int] | None = None
    """Matryoshka's nested prefixes of latents, increasing, space-separated: --matryoshka_widths
    128 512 2048 (the number of latents is added last where it is not)."""

    matryoshka_selection: str = "batchtopk"
    """How Matryoshka selects latents: batchtopk (the default, as Bussmann et al.) or topk."""

    def architecture_options(self) -> dict[str, Any]:
        """The architecture and its options, as `MLSAE` takes them."""
        names = ("architecture", "batchtopk_capacity", "batchtopk_pool", "matryoshka_widths")
        return {name: getattr(self, name) for name in (*names, "matryoshka_selection")}

    def check_architecture(self) -> None:
        """A one-line `ConfigError` for architecture options that cannot work (those that
        need the number of latents are checked when the model is built)."""
        options = self.architecture_options()
        architecture = options.pop("architecture")
        check_variant_options(architecture, self.k, *options.values())


@dataclass
class MLSAEHyperparameters(MLSAEConfig):
    """Everything an `MLSAETransformer` is built from."""

    model_name: str = "EleutherAI/pythia-70m-deduped"
    """A hub id or local folder of a causal LM and its tokenizer."""

    layers: list[int] | None = None
    """The decoder blocks to train on, space-separated: --layers 0 2 5 (omitted: all)."""

    site: str = "resid_post"
    """Where the MLSAE reads each layer: resid_post (the block's output), resid_pre (its
    input), attn_out or mlp_out (what attention or the MLP adds to the residual stream),
    mlp_in (the MLP's normalised input) or attn_z (the heads' outputs entering attention's
    output projection, heads x head_dim wide)."""

    max_length: int = 2048
    """Tokens per sequence."""

    batch_size: int = 1
    """Sequences per micro-batch."""

    accumulate_grad_batches: int = 64
    """Micro-batches per optimizer step."""

    dead_steps_threshold: int | None = None
    """Kept for published configs; no effect (dead latents are counted in tokens)."""

    tuned_lens_path: str | None = None
    """A local folder with the tuned lens (default: the tuned-lens release on the hub)."""

    skip_non_finite: bool = False
    """Skip optimizer steps with NaN/inf in the residual stream or loss (with a warning)
    instead of stopping the run with an error naming the layer and step."""

    PUBLISHED = (
        "model_name",
        "layers",
        "expansion_factor",
        "k",
        "auxk",
        "auxk_coef",
        "dead_tokens_threshold",
        "dead_threshold",
        "lr",
        "standardize",
        "skip_special_tokens",
        "max_length",
        "batch_size",
        "accumulate_grad_batches",
        "tuned_lens",
        "dead_steps_threshold",
    )
    """The constructor's arguments in the original's order (it took them positionally)
    and the keys of every published `config.json`."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every field: the published ones first, in their order, then the others."""
        others = [f.name for f in fields(cls) if f.name not in cls.PUBLISHED]
        return (*cls.PUBLISHED, *others)

    @classmethod
    def new_names(cls) -> tuple[str, ...]:
        """The fields that configs written by the original never hold."""
        return tuple(name for name in cls.names() if name not in cls.PUBLISHED)

    @classmethod
    def signature(cls) -> inspect.Signature:
        """`(self, model_name=..., layers=..., ...)`: the constructor's signature."""
        by_name = {f.name: f for f in fields(cls)}
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for name in cls.names():
            declared = by_name[name]
            default = declared.default
            if default is MISSING:
                default = declared.default_factory()  # type: ignore[misc]
            parameters.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=default,
                    annotation=declared.type,
                )
            )
        return inspect.Signature(parameters)

    @classmethod
    def bind(cls, *args: Any, **kwargs: Any) -> "MLSAEHyperparameters":
        """The hyperparameters for constructor arguments (positional in the original's
        order, or by name); an unknown or repeated one raises TypeError."""
        bound = cls.signature().bind(None, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return cls(**arguments)

    def to_config(self) -> dict[str, Any]:
        """The flat `config.json`: every published key, and the others where they differ
        from their defaults (so that a model trained with the original's options keeps
        exactly its keys, and the original's code loads it)."""
        values = asdict(self)
        defaults = _defaults(type(self))
        return {
            name: values[name]
            for name in self.names()
            if name in self.PUBLISHED or values[name] != defaults[name]
        }


def check_site(site: str, tuned_lens: bool) -> None:
    """Refuse an unknown site, and a tuned lens anywhere but the residual stream after each
    block, which is what the lens translates."""
    if site not in SITES:
        raise ConfigError(f"--site must be one of {', '.join(SITES)}, not {site!r}")
    if tuned_lens and site != "resid_post":
        raise ConfigError(
            f"--tuned_lens translates the residual stream after each block: it needs "
            f"--site resid_post, not {site}"
        )


def _defaults(cls: type[MLSAEHyperparameters]) -> dict[str, Any]:
    """The default value of every field of `cls`."""
    return {
        name: parameter.default
        for name, parameter in cls.signature().parameters.items()
        if name != "self"
    }
