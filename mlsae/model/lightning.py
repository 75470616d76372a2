"""`MLSAETransformer`: the LightningModule that wires a frozen transformer to an MLSAE.

The residual stream comes from `mlsae.lm`, encoding and decoding from `MLSAE`, the loss
from `mlsae.model.losses`, the optimizer and its schedule from `mlsae.model.optimization`,
metrics from `mlsae.metrics`. Its hyperparameters are `MLSAEHyperparameters`; its saved
layout is the published `-tfm` one.
"""

import logging
import math
import os
from dataclasses import asdict
from typing import Any

import torch
from jaxtyping import Float, Int
from lightning.pytorch import LightningModule
from torch import Tensor

from mlsae.lm.lens import TunedLens, load_tuned_lens
from mlsae.lm.splice import ablated_losses, spliced_metrics
from mlsae.lm.stream import ResidualStream, read_residual_stream
from mlsae.lm.transformer import Transformer
from mlsae.model.autoencoder import MLSAE, AutoencoderOutput
from mlsae.model.card import mlsae_transformer_card
from mlsae.model.checkpoint import (
    leave_out_transformer,
    leaves_out_transformer,
    restore_transformer,
)
from mlsae.model.evaluation import evaluation_metrics
from mlsae.model.firing import StepFiring, StepMinimum
from mlsae.model.geom_median import geometric_median
from mlsae.model.hparams import MLSAEHyperparameters, check_site
from mlsae.model.hub import CheckpointError, StrictHubMixin, download_options, read_config
from mlsae.model.losses import mlsae_loss
from mlsae.model.maintenance import maintain_decoder
from mlsae.model.metric_sets import (
    comparison_metrics,
    log_selection,
    reconstruction_metrics,
    selection_metrics,
)
from mlsae.model.metric_sets import spliced_metrics as spliced_metric_set
from mlsae.model.non_finite import NonFiniteTracker
from mlsae.model.optimization import configure_adam
from mlsae.model.resolve import find_language_model
from mlsae.model.variants import min_positive

__all__ = ["MLSAETransformer", "ResidualStream"]

logger = logging.getLogger(__name__)


class MLSAETransformer(StrictHubMixin, LightningModule):
    """A Multi-Layer SAE trained on the residual stream (or another `site`) of every
    selected layer of a frozen causal LM.

    Constructed from the fields of `MLSAEHyperparameters` (by name, or positionally in the
    original's order); each is also an attribute, except that `layers` is the list of
    blocks. `.transformer` is the frozen LM, `.autoencoder` the `MLSAE`, `.lens` the tuned
    lens of `-lens` models.
    """

    _optional_keys = (r"autoencoder\.tokens_since_fired",)
    _new_config_keys = MLSAEHyperparameters.new_names()
    _ignored_keys = (
        r"autoencoder\.last_nonzero",
        r"(loss|logits)_(true|pred)",
        r"lens\.unembed\..*",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Not super(): Lightning's save_hyperparameters reads the arguments from the
        # frame of an __init__ that refers to its class, and these are in `kwargs`.
        LightningModule.__init__(self)
        hparams = MLSAEHyperparameters.bind(*args, **kwargs)
        check_site(hparams.site, hparams.tuned_lens)
        hparams.check_architecture()
        self.save_hyperparameters(asdict(hparams))
        self._hub_mixin_config = hparams.to_config()
        self.hyperparameters = hparams
        for name, value in asdict(hparams).items():
            setattr(self, name, value)
        self.dead_steps_threshold = hparams.dead_steps_threshold or max(
            1,
            hparams.dead_tokens_threshold
            // (hparams.batch_size * hparams.max_length * hparams.accumulate_grad_batches),
        )

        from_checkpoint = self.weights_from_checkpoint()
        self.transformer = Transformer(
            hparams.model_name,
            max_length=hparams.max_length,
            batch_size=hparams.batch_size,
            skip_special_tokens=hparams.skip_special_tokens,
            layers=hparams.layers,
            load_weights=not self.frozen_weights_from_checkpoint(),
            site=hparams.site,
        )
        context = self.transformer.context_length
        if context is not None and hparams.max_length > context:
            raise ValueError(
                f"max_length {hparams.max_length} is longer than {hparams.model_name}'s "
                f"context ({context})"
            )
        self.layers = self.transformer.layers
        self.n_layers = self.transformer.n_layers
        self.n_inputs = self.transformer.width
        self.n_latents = self.n_inputs * hparams.expansion_factor
        self.autoencoder = MLSAE(
            self.n_inputs,
            self.n_latents,
            hparams.k,
            self.dead_steps_threshold,
            hparams.dead_threshold,
            hparams.auxk,
            hparams.standardize,
            dead_tokens_threshold=hparams.dead_tokens_threshold,
            **hparams.architecture_options(),
        )
        self.lens: TunedLens | None = None
        if hparams.tuned_lens:
            n_blocks = self.transformer.n_blocks
            self.lens = (
                TunedLens(self.n_inputs, n_blocks)
                if from_checkpoint
                else load_tuned_lens(
                    hparams.model_name, self.n_inputs, n_blocks, hparams.tuned_lens_path
                )
            )

        # A pretrained model's bias is already trained: never re-initialise it.
        self.bias_initialized = from_checkpoint
        self.tokens_seen = 0
        self.micro_batches_seen = 0
        self.non_finite = NonFiniteTracker(self.layers)
        self.step_firing = StepFiring()
        self.step_minimum = StepMinimum()
        self.train_metrics = reconstruction_metrics(
            self.layers, self.n_latents, hparams.dead_tokens_threshold, hparams.dead_threshold
        )
        self.val_metrics = spliced_metric_set(self.layers)
        widths = self.autoencoder.variant.widths
        self.selection_metrics = selection_metrics(self.layers, hparams.dead_threshold, widths)

    __init__.__signature__ = MLSAEHyperparameters.signature()  # type: ignore[attr-defined]

    # Loading --------------------------------------------------------------------

    _local_path_keys = ("model_name", "tuned_lens_path")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """Load a published or saved `-tfm` model: weights from the checkpoint, the
        transformer's config and tokenizer from `model_name` (override it to point at a
        local copy).

        Without `model_name=`, the stored one is looked for as given from the working
        directory, then relative to the model's folder, then as a hub id (docs/models.md).
        """
        model_id = str(pretrained_model_name_or_path)
        asked = kwargs.get("model_name")
        trained_on = _configured_model_name(model_id, kwargs)
        if asked is None and trained_on is not None:
            kwargs["model_name"] = find_language_model(trained_on, os.path.expanduser(model_id))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except CheckpointError as error:
            if asked is not None and trained_on is not None and asked != trained_on:
                raise CheckpointError(
                    f"{error} (the checkpoint was trained on {trained_on!r}, not {asked!r})"
                ) from error
            raise

    @classmethod
    def load_checkpoint_weights(
        cls, ckpt_path: str, map_location: str = "cpu"
    ) -> "MLSAETransformer":
        """Load a Lightning checkpoint of this module, read as data and loaded strictly.
        The transformer's weights come from the checkpoint where it holds them (nothing is
        downloaded but the transformer's config and tokenizer); a checkpoint that records
        them by fingerprint (as training writes them) loads `model_name`'s weights and
        checks them against it."""
        return cls.load_lightning_checkpoint(ckpt_path, map_location)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The card `save_pretrained` writes: `mlsae.model.card`, with the held-out metrics
        set in `held_out_metrics` (the final validation's, after training)."""
        return mlsae_transformer_card(self, getattr(self, "held_out_metrics", None))

    # The residual stream and the autoencoder ---------------------------------------

    def residual_stream(self, tokens: Int[Tensor, "batch pos"]) -> ResidualStream:
        """The activations at `site` of every layer for `tokens`, as the autoencoder sees
        them."""
        return read_residual_stream(
            self.transformer,
            tokens.to(self.device),
            skip_special_tokens=self.skip_special_tokens,
            count_special_tokens=self.count_special_tokens,
            lens=self.lens,
        )

    def to_transformer_space(
        self, recons: Float[Tensor, "layer batch pos d_model"]
    ) -> Float[Tensor, "layer batch pos d_model"]:
        """Reconstructions in the transformer's space (undoes the tuned lens)."""
        return recons if self.lens is None else self.lens.inverse(recons, self.layers)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> AutoencoderOutput:
        """The autoencoder's output for `tokens`, reconstructions in the transformer's space."""
        stream = self.residual_stream(tokens)
        output = self.autoencoder(stream.inputs)
        return output._replace(recons=self.to_transformer_space(output.recons))

    # Training ---------------------------------------------------------------------

    def _initialize_bias(self, stream: ResidualStream) -> None:
        """Set the pre-encoder bias to the geometric median of the encoder's inputs in
        the space where it is subtracted, once per run, the same on every rank."""
        inputs_std, _ = self.autoencoder._standardize(stream.inputs)
        median = geometric_median(inputs_std.detach(), stream.mask)
        if self._trainer is not None and self.trainer.world_size > 1:
            median = self.trainer.strategy.broadcast(median, src=0)
        with torch.no_grad():
            self.autoencoder.pre_encoder_bias.copy_(median)
        self.bias_initialized = True

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._count_batch(batch["input_ids"])
        stream = self.residual_stream(batch["input_ids"])
        stream = stream._replace(inputs=self.non_finite.sanitize(stream.inputs)[0])
        if not self.bias_initialized:
            self._initialize_bias(stream)
        result = self.autoencoder.forward_standardized(stream.inputs, stream.mask)
        output = result.output
        loss = mlsae_loss(stream.inputs, result, stream.mask, self.auxk_coef)
        self.non_finite.observe_loss(loss.total)
        if self.autoencoder.variant.batchtopk:
            self.step_minimum.add(min_positive(output.topk.values))

        self.step_firing.add(
            self.autoencoder.fired_counts(output.topk, stream.mask), stream.n_counted()
        )

        metrics = self.train_metrics(
            inputs=stream.inputs,
            recons=output.recons,
            values=output.topk.values,
            indices=output.topk.indices,
            mask=stream.mask,
        )
        logged = {"loss/total": loss.total, "loss/mse": loss.fvu, "loss/auxk": loss.auxk}
        logged["train/dead/abs"] = output.dead
        logged.update(self._selection_metrics(stream, result))
        if self.autoencoder.variant.batchtopk:
            logged["train/batchtopk/threshold"] = self.autoencoder.batchtopk_threshold.float()
        self.log_dict({**metrics, **logged}, batch_size=stream.inputs.shape[1])
        return loss.total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        maintain_decoder(self.autoencoder.decoder)
        skip = self.non_finite.end_step(self.global_step)
        optimizer.skip_step_if(skip)
        self.step_firing.apply(self.autoencoder, skip, self._sum_over_ranks)
        self.step_minimum.apply(self.autoencoder, skip, lambda t: self._sum_over_ranks(t, "min"))

    def _sum_over_ranks(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """`tensor` reduced over the ranks by `op` (sum, or min)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    def _selection_metrics(self, stream: ResidualStream, result: Any) -> dict[str, Tensor]:
        """`metric_sets.log_selection` of this micro-batch."""
        metrics, batchtopk = self.selection_metrics, self.autoencoder.variant.batchtopk
        inputs, mask = stream.inputs, stream.mask
        return log_selection(metrics, batchtopk, self.n_latents, inputs, result, mask)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        interval = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(1, interval) == 0:
            message = self.non_finite.report(self.skip_non_finite)
            if message:
                logger.warning(message)

    def _count_batch(self, tokens: Tensor) -> None:
        # Counted here, not in on_train_batch_end: checkpoint callbacks run before it.
        world_size = 1 if self._trainer is None else self.trainer.world_size
        self.tokens_seen += tokens.numel() * world_size
        self.micro_batches_seen += world_size

    def configure_optimizers(self) -> Any:
        total_steps = self.trainer.estimated_stepping_batches if self._trainer else math.inf
        return configure_adam(
            self.autoencoder.parameters(),
            self.lr,
            self.adam_eps,
            self.lr_warmup_steps,
            self.lr_decay_steps,
            total_steps,
        )

    # Evaluation -------------------------------------------------------------------

    def spliced_metrics(
        self,
        tokens: Int[Tensor, "batch pos"],
        stream: ResidualStream,
        recons: Float[Tensor, "layer batch pos d_model"],
    ) -> dict[str, Float[Tensor, " layer"]]:
        """`mlsae.lm.splice.spliced_metrics` for this model's transformer."""
        return spliced_metrics(self.transformer, tokens, stream, recons)

    def _evaluate(self, batch: dict[str, Tensor], compare: bool = False) -> dict[str, Tensor]:
        tokens = batch["input_ids"]
        stream = self.residual_stream(tokens)
        result = self.autoencoder.forward_standardized(stream.inputs, stream.mask)
        recons = self.to_transformer_space(result.output.recons)
        spliced = self.spliced_metrics(tokens, stream, recons)
        # Test only: the ablations cost two forward passes per layer.
        ablated = ablated_losses(self.transformer, tokens, stream) if compare else None
        return evaluation_metrics(self, stream, result, spliced, ablated)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Held-out values of the training metrics go under val/ too (val/fvu/avg, ...).
        logged = {_validation_name(name): value for name, value in self._evaluate(batch).items()}
        self.log_dict(logged, batch_size=batch["input_ids"].shape[0])

    def on_test_epoch_start(self) -> None:
        self.comparison_metrics = comparison_metrics(self.layers, self.n_inputs, self.n_latents)
        self.comparison_metrics.to(self.device)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logged = self._evaluate(batch, compare=True)
        self.log_dict(logged, batch_size=batch["input_ids"].shape[0])

    def on_test_epoch_end(self) -> None:
        # SAELens' and SAEBench's numbers, over the whole evaluation rather than per batch.
        self.log_dict(self.comparison_metrics.compute())
        self.comparison_metrics.reset()

    # Checkpoints --------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mlsae"] = {
            "bias_initialized": self.bias_initialized,
            "tokens_seen": self.tokens_seen,
            "micro_batches_seen": self.micro_batches_seen,
        }
        leave_out_transformer(self.transformer, checkpoint)

    @classmethod
    def frozen_weights_left_out(cls, checkpoint: dict[str, Any]) -> bool:
        return leaves_out_transformer(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_transformer(self, checkpoint, "the checkpoint")
        state = checkpoint.get("mlsae", {})
        self.bias_initialized = state.get("bias_initialized", True)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.micro_batches_seen = state.get("micro_batches_seen", 0)


def _validation_name(name: str) -> str:
    if name.startswith("train/"):
        return "val/" + name[len("train/") :]
    if name.startswith("loss/"):
        return "val/" + name
    return name


def _configured_model_name(model_id: str, kwargs: dict[str, Any]) -> str | None:
    """The `model_name` stored in the config of the saved model `model_id`, or None when
    there is none (a folder of another kind, which `from_pretrained` then names)."""
    name = read_config(os.path.expanduser(model_id), **download_options(kwargs)).get("model_name")
    return name if isinstance(name, str) else None
