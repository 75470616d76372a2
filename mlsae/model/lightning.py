"""`MLSAETransformer`: the LightningModule that wires a frozen transformer to an MLSAE.

It owns no maths: the residual stream comes from `Transformer`, encoding and
decoding from `MLSAE`, losses from `mlsae.model.losses`, metrics from
`mlsae.metrics`. Its saved layout is the published `-tfm` one.
"""

import contextvars
import logging
import math
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MetricCollection

from mlsae.lm.lens import TunedLens, load_tuned_lens
from mlsae.lm.transformer import Transformer
from mlsae.metrics import (
    DeadLatents,
    LayerwiseFVU,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseLogitKLDiv,
    LayerwiseLogitMSE,
    LayerwiseLossDelta,
    LayerwiseMSE,
    LayerwiseWrapper,
)
from mlsae.metrics.spliced import logit_kldiv, logit_mse, next_token_loss
from mlsae.model.autoencoder import (
    MLSAE,
    AutoencoderOutput,
    maintain_decoder,
)
from mlsae.model.checkpoint import read_checkpoint
from mlsae.model.geom_median import geometric_median
from mlsae.model.hub import CheckpointError, StrictHubMixin, load_state_dict_strictly, read_config
from mlsae.model.losses import auxk_loss, layerwise_fvu
from mlsae.model.non_finite import NonFiniteTracker
from mlsae.sparse import make_adam

logger = logging.getLogger(__name__)

# True while `from_pretrained` builds a module whose weights the checkpoint holds.
_WEIGHTS_FROM_CHECKPOINT = contextvars.ContextVar("weights_from_checkpoint", default=False)


class ResidualStream(NamedTuple):
    """One batch of the transformer's residual stream, as the autoencoder sees it."""

    raw: Float[Tensor, "layer batch pos d_model"]
    """The block outputs, unmasked, in the transformer's space."""

    inputs: Float[Tensor, "layer batch pos d_model"]
    """What the autoencoder encodes: special positions zeroed (with
    `skip_special_tokens`), translated by the tuned lens (with `tuned_lens`)."""

    mask: Bool[Tensor, "batch pos"] | None
    """The positions that count in losses and metrics (None: all of them)."""

    special: Bool[Tensor, "batch pos"] | None
    """The zeroed special-token positions (None without `skip_special_tokens`)."""

    def zeroed(self) -> Float[Tensor, "layer batch pos d_model"]:
        """The block outputs with the special-token positions zeroed, if any."""
        if self.special is None:
            return self.raw
        return self.raw.masked_fill(self.special[None, :, :, None], 0.0)


class MLSAETransformer(StrictHubMixin, LightningModule):
    """A Multi-Layer SAE trained on the residual stream of a frozen causal LM."""

    _optional_keys = (r"autoencoder\.tokens_since_fired",)
    _new_config_keys = (
        "count_special_tokens",
        "adam_eps",
        "lr_warmup_steps",
        "lr_decay_steps",
        "tuned_lens_path",
        "skip_non_finite",
    )
    _ignored_keys = (
        r"autoencoder\.last_nonzero",
        r"(loss|logits)_(true|pred)",
        r"lens\.unembed\..*",
    )

    def __init__(
        self,
        model_name: str = "EleutherAI/pythia-70m-deduped",
        layers: list[int] | None = None,
        expansion_factor: int = 64,
        k: int = 32,
        auxk: int | None = 256,
        auxk_coef: float | None = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        dead_threshold: float = 1e-3,
        lr: float = 1e-4,
        standardize: bool = True,
        skip_special_tokens: bool = True,
        max_length: int = 2048,
        batch_size: int = 1,
        accumulate_grad_batches: int = 64,
        tuned_lens: bool = False,
        dead_steps_threshold: int | None = None,
        count_special_tokens: bool = False,
        adam_eps: float = 6.25e-10,
        lr_warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        tuned_lens_path: str | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        """
        Args:
            model_name: A hub id or local folder of a causal LM (and its tokenizer).
            layers: The decoder blocks whose outputs are encoded (None: all).
            expansion_factor: The number of latents over the model's width.
            k: The number of latents kept per vector.
            auxk: How many dead latents model the residual error (None: no AuxK).
            auxk_coef: The weight of the AuxK loss (None: 0).
            dead_tokens_threshold: Training tokens without firing after which a
                latent is dead.
            dead_threshold: The activation above which a latent counts as fired.
            lr: Adam's learning rate.
            standardize: Whether to standardise every residual vector.
            skip_special_tokens: Whether BOS/EOS/PAD positions are zeroed.
            max_length: Tokens per sequence.
            batch_size: Sequences per micro-batch.
            accumulate_grad_batches: Micro-batches per optimizer step.
            tuned_lens: Whether to translate the residual stream with the model's
                tuned lens before encoding (the paper's `-lens` models).
            dead_steps_threshold: Kept for published configs; no effect.
            count_special_tokens: Whether the zeroed special-token positions count
                in losses, metrics and the dead-latent state, as in the original.
            adam_eps: Adam's epsilon.
            lr_warmup_steps: Optimizer steps of linear warm-up from 0 to `lr`.
            lr_decay_steps: Final optimizer steps of linear decay to 0.
            tuned_lens_path: A local folder with the tuned lens (default: the
                tuned-lens release on the hub).
            skip_non_finite: Skip optimizer steps whose residual stream or loss is not
                finite (and warn), instead of stopping the run with an error.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model_name
        self.expansion_factor = expansion_factor
        self.k = k
        self.auxk = auxk
        self.auxk_coef = auxk_coef
        self.dead_tokens_threshold = dead_tokens_threshold
        self.dead_threshold = dead_threshold
        self.lr = lr
        self.standardize = standardize
        self.skip_special_tokens = skip_special_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.tuned_lens = tuned_lens
        self.count_special_tokens = count_special_tokens
        self.adam_eps = adam_eps
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.skip_non_finite = skip_non_finite
        self.dead_steps_threshold = dead_steps_threshold or max(
            1, dead_tokens_threshold // (batch_size * max_length * accumulate_grad_batches)
        )

        from_checkpoint = _WEIGHTS_FROM_CHECKPOINT.get()
        self.transformer = Transformer(
            model_name,
            max_length=max_length,
            batch_size=batch_size,
            skip_special_tokens=skip_special_tokens,
            layers=layers,
            load_weights=not from_checkpoint,
        )
        context = self.transformer.context_length
        if context is not None and max_length > context:
            raise ValueError(
                f"max_length {max_length} is longer than {model_name}'s context ({context})"
            )
        self.layers = self.transformer.layers
        self.n_layers = self.transformer.n_layers
        self.n_inputs = self.transformer.d_model
        self.n_latents = self.n_inputs * expansion_factor

        self.autoencoder = MLSAE(
            self.n_inputs,
            self.n_latents,
            k,
            self.dead_steps_threshold,
            dead_threshold,
            auxk,
            standardize,
            dead_tokens_threshold=dead_tokens_threshold,
        )
        self.lens: TunedLens | None = None
        if tuned_lens:
            n_blocks = self.transformer.n_blocks
            self.lens = (
                TunedLens(self.n_inputs, n_blocks)
                if from_checkpoint
                else load_tuned_lens(model_name, self.n_inputs, n_blocks, tuned_lens_path)
            )

        # A pretrained model's bias is already trained: never re-initialise it.
        self.bias_initialized = from_checkpoint
        self.tokens_seen = 0
        self.micro_batches_seen = 0
        self.non_finite = NonFiniteTracker(self.layers)
        self._step_fired: Tensor | None = None
        self._step_tokens: Tensor | None = None

        def layerwise(metric: Any, prefix: str) -> LayerwiseWrapper:
            return LayerwiseWrapper(metric, layers=self.layers, prefix=prefix)

        n = self.n_layers
        self.train_metrics = MetricCollection(
            {
                "dead/rel": DeadLatents(self.n_latents, dead_tokens_threshold),
                "fvu": layerwise(LayerwiseFVU(n), "fvu/"),
                "l0": layerwise(LayerwiseL0Norm(n, dead_threshold), "l0/"),
                "l1": layerwise(LayerwiseL1Norm(n), "l1/"),
                "mse": layerwise(LayerwiseMSE(n), "mse/"),
            },
            prefix="train/",
        )
        self.val_metrics = MetricCollection(
            {
                "logit/kldiv": layerwise(LayerwiseLogitKLDiv(n), "logit/kldiv/"),
                "logit/mse": layerwise(LayerwiseLogitMSE(n), "logit/mse/"),
                "loss/delta": layerwise(LayerwiseLossDelta(n), "loss/delta/"),
            },
            prefix="val/",
        )

    # Loading --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """Load a published or saved `-tfm` model: weights from the checkpoint, the
        transformer's config and tokenizer from `model_name` (override it to point at a
        local copy)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except CheckpointError as error:
            trained_on = _configured_model_name(pretrained_model_name_or_path)
            asked = kwargs.get("model_name")
            if asked is not None and trained_on is not None and asked != trained_on:
                raise CheckpointError(
                    f"{error} (the checkpoint was trained on {trained_on!r}, not {asked!r})"
                ) from error
            raise

    @classmethod
    def _from_pretrained(cls, **kwargs: Any) -> "MLSAETransformer":
        token = _WEIGHTS_FROM_CHECKPOINT.set(True)
        try:
            return super()._from_pretrained(**kwargs)
        finally:
            _WEIGHTS_FROM_CHECKPOINT.reset(token)

    @classmethod
    def load_checkpoint_weights(
        cls, ckpt_path: str, map_location: str = "cpu"
    ) -> "MLSAETransformer":
        """Load a Lightning checkpoint of this module, the transformer's weights included
        (nothing is downloaded but the transformer's config and tokenizer). The file is read
        as data (`read_checkpoint`) and its weights are loaded strictly."""
        checkpoint = read_checkpoint(ckpt_path, map_location)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict):
            raise CheckpointError(f"{ckpt_path} holds no hyperparameters of {cls.__name__}")
        cls._check_config(dict(hparams), source=str(ckpt_path))
        token = _WEIGHTS_FROM_CHECKPOINT.set(True)
        try:
            model = cls(**hparams)
        finally:
            _WEIGHTS_FROM_CHECKPOINT.reset(token)
        load_state_dict_strictly(
            model,
            checkpoint["state_dict"],
            optional=cls._optional_keys,
            ignored=cls._ignored_keys,
            source=str(ckpt_path),
        )
        model.on_load_checkpoint(checkpoint)
        return model.eval()

    # The residual stream and the autoencoder ---------------------------------------

    def residual_stream(self, tokens: Int[Tensor, "batch pos"]) -> ResidualStream:
        """The block outputs for `tokens`, as the autoencoder sees them."""
        tokens = tokens.to(self.device)
        raw = self.transformer.residual_stream(tokens)
        special = mask = None
        if self.skip_special_tokens:
            special = self.transformer.special_token_mask(tokens)
            if not self.count_special_tokens:
                mask = ~special
        stream = ResidualStream(raw, raw, mask, special)
        inputs = stream.zeroed()
        if self.lens is not None:
            inputs = self.lens(inputs, self.layers)
        return stream._replace(inputs=inputs)

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

    def _count_tokens(self, stream: ResidualStream) -> Tensor:
        if stream.mask is None:
            return torch.tensor(stream.inputs.shape[1] * stream.inputs.shape[2], device=self.device)
        return stream.mask.sum()

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
        inputs, _ = self.non_finite.sanitize(stream.inputs)
        stream = stream._replace(inputs=inputs)
        if not self.bias_initialized:
            self._initialize_bias(stream)
        result = self.autoencoder.forward_standardized(stream.inputs)
        output = result.output

        fvu = layerwise_fvu(stream.inputs, output.recons, stream.mask).mean()
        loss = fvu
        aux = torch.zeros((), device=self.device)
        if self.auxk is not None and output.auxk.values.shape[-1] > 0:
            aux = auxk_loss(result.inputs - result.recons, output.auxk_recons, stream.mask)
            loss = loss + (self.auxk_coef or 0.0) * aux

        self.non_finite.observe_loss(loss)

        fired = self.autoencoder.fired_counts(output.topk, stream.mask)
        tokens = self._count_tokens(stream)
        self._step_fired = fired if self._step_fired is None else self._step_fired + fired
        self._step_tokens = tokens if self._step_tokens is None else self._step_tokens + tokens

        metrics = self.train_metrics(
            inputs=stream.inputs,
            recons=output.recons,
            values=output.topk.values,
            indices=output.topk.indices,
            mask=stream.mask,
        )
        self.log_dict(
            {
                **metrics,
                "loss/total": loss,
                "loss/mse": fvu,
                "loss/auxk": aux,
                "train/dead/abs": output.dead,
            },
            batch_size=stream.inputs.shape[1],
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        maintain_decoder(self.autoencoder.decoder)
        skip = self.non_finite.end_step(self.global_step)
        optimizer.skip_step_if(skip)
        self._update_dead_latents(skip)

    def _update_dead_latents(self, skip: Tensor) -> None:
        if self._step_fired is None:
            return
        fired, tokens = self._step_fired, self._step_tokens
        if self._trainer is not None and self.trainer.world_size > 1:
            fired = self.trainer.strategy.reduce(fired, reduce_op="sum")
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        # A skipped step leaves the dead-latent state as it was.
        self.autoencoder.update_dead_latents(fired * ~skip, tokens * ~skip)
        self._step_fired = self._step_tokens = None

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
        optimizer = make_adam(self.autoencoder.parameters(), lr=self.lr, eps=self.adam_eps)
        if not self.lr_warmup_steps and not self.lr_decay_steps:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches if self._trainer else math.inf
        warmup, decay = self.lr_warmup_steps, self.lr_decay_steps

        def factor(step: int) -> float:
            scale = 1.0
            if warmup and step < warmup:
                scale = (step + 1) / warmup
            if decay and math.isfinite(total_steps) and step >= total_steps - decay:
                scale = min(scale, max(0.0, (total_steps - step) / decay))
            return scale

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # Evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def spliced_metrics(
        self,
        tokens: Int[Tensor, "batch pos"],
        stream: ResidualStream,
        recons: Float[Tensor, "layer batch pos d_model"],
    ) -> dict[str, Float[Tensor, " layer"]]:
        """Per layer: CE loss with the true stream and with the reconstruction spliced in
        after that layer's block, logit MSE and KL divergence; one layer at a time.

        With special tokens counted (the original's numbers), the "true" stream is the
        zeroed one the autoencoder saw; otherwise it is the model's own, and the
        reconstruction replaces it only at the positions that count.
        """
        tokens = tokens.to(self.device)
        mask = stream.mask
        true_stack, pred_stack, clean_logits = stream.zeroed(), recons, None
        if mask is not None:
            pred_stack = torch.where(mask[None, :, :, None], recons, stream.raw)
        if mask is not None or stream.special is None:
            # Splicing the unmodified stream gives the model's own logits at every layer.
            clean_logits = self.transformer.model(input_ids=tokens, use_cache=False).logits
        values: dict[str, list[Tensor]] = {k: [] for k in ("loss_true", "loss_pred", "mse", "kl")}
        for position in range(self.n_layers):
            if clean_logits is None:
                logits_true = self.transformer.forward_at_layer(true_stack, position, "logits")
            else:
                logits_true = clean_logits
            logits_pred = self.transformer.forward_at_layer(pred_stack, position, "logits")
            values["loss_true"].append(next_token_loss(logits_true, tokens, mask))
            values["loss_pred"].append(next_token_loss(logits_pred, tokens, mask))
            values["mse"].append(logit_mse(logits_true, logits_pred, mask))
            values["kl"].append(logit_kldiv(logits_true, logits_pred, mask))
        return {key: torch.stack(value) for key, value in values.items()}

    def _evaluate(self, batch: dict[str, Tensor], with_train_metrics: bool) -> dict[str, Tensor]:
        tokens = batch["input_ids"]
        stream = self.residual_stream(tokens)
        result = self.autoencoder.forward_standardized(stream.inputs)
        output = result.output
        recons = self.to_transformer_space(output.recons)
        spliced = self.spliced_metrics(tokens, stream, recons)
        logged = dict(
            self.val_metrics(
                loss_true=spliced["loss_true"],
                loss_pred=spliced["loss_pred"],
                logit_mse=spliced["mse"],
                logit_kldiv=spliced["kl"],
            )
        )
        if with_train_metrics:
            # The reconstruction error is measured in the autoencoder's space.
            logged.update(
                self.train_metrics(
                    inputs=stream.inputs,
                    recons=output.recons,
                    values=output.topk.values,
                    indices=output.topk.indices,
                    mask=stream.mask,
                )
            )
            fvu = layerwise_fvu(stream.inputs, output.recons, stream.mask).mean()
            aux = torch.zeros((), device=self.device)
            if self.auxk is not None and output.auxk.values.shape[-1] > 0:
                aux = auxk_loss(result.inputs - result.recons, output.auxk_recons, stream.mask)
            logged.update(
                {
                    "loss/total": fvu + (self.auxk_coef or 0.0) * aux,
                    "loss/mse": fvu,
                    "loss/auxk": aux,
                }
            )
        return logged

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Held-out values of the training metrics go under val/ too (val/fvu/avg, ...).
        logged = {
            _validation_name(name): value for name, value in self._evaluate(batch, True).items()
        }
        self.log_dict(logged, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log_dict(self._evaluate(batch, True), batch_size=batch["input_ids"].shape[0])

    # Checkpoints --------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mlsae"] = {
            "bias_initialized": self.bias_initialized,
            "tokens_seen": self.tokens_seen,
            "micro_batches_seen": self.micro_batches_seen,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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


def _configured_model_name(model_id: Any) -> str | None:
    try:
        return read_config(str(model_id)).get("model_name")
    except Exception:
        return None
