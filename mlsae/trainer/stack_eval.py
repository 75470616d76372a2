"""`python test.py --sae`: a stack of per-layer SAEs (`mlsae.saes.stack`) evaluated with the
metrics of an MLSAE's evaluation, under the same column names (docs/evaluation.md).

Each SAE reads its site unmasked (special tokens included, as it was trained). Its
reconstruction (a transcoder's: its prediction of the site it writes) is compared with the
activations of the site it writes, and replaces them at the positions that count. The SAEs'
widths may differ, so each SAE has its own metrics, those of an MLSAE's metric sets for one
layer; the columns averaged over batches are means weighted by batch size, as Lightning
logs an MLSAE's.
"""

from collections import defaultdict
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mlsae.cli import ConfigError
from mlsae.lm.architecture import text_config
from mlsae.lm.data import held_out_stream, load_tokenizer
from mlsae.lm.sites import site_width
from mlsae.lm.transformer import Transformer
from mlsae.metrics.firing import FIRING_THRESHOLD
from mlsae.metrics.spliced import count_predictions, logit_kldiv, logit_mse, next_token_loss
from mlsae.model.hparams import MLSAEConfig
from mlsae.model.metric_sets import comparison_metrics, reconstruction_metrics, spliced_metrics
from mlsae.saes.stack import SAEStack, load_sae_stack
from mlsae.saes.stack_reader import StackReader, written_site
from mlsae.trainer.config import TestConfig
from mlsae.types import TopK
from mlsae.utils import get_device

DEAD_TOKENS_THRESHOLD = MLSAEConfig.dead_tokens_threshold
"""An MLSAE's default: a latent that fires less often than once per this many tokens of a
batch counts as dead in `train/dead/rel`."""


class LayerBatch(NamedTuple):
    """What one SAE of the stack gives for one batch."""

    targets: Float[Tensor, "batch pos width"]
    """The activations of the site the SAE writes (the site it reads, but a transcoder's)."""

    recons: Float[Tensor, "batch pos width"]
    """The SAE's reconstruction of them."""

    latents: TopK
    """`[batch, pos, k]` the non-zero activations of each vector, padded with value 0 to
    the most that one vector has."""


def check_one_per_block(stack: SAEStack) -> None:
    """A `ConfigError` for two SAEs of one block: the columns are per block."""
    seen: dict[int, str] = {}
    for sae, name in zip(stack, stack.names, strict=True):
        if sae.layer in seen:
            raise ConfigError(
                f"{seen[sae.layer]} and {name} both read block {sae.layer}: test.py takes one "
                "SAE per block (evaluate each site's SAEs as a stack of their own)"
            )
        seen[sae.layer] = name


def load_stack(config: TestConfig, device: torch.device) -> StackReader:
    """The SAEs of --sae over the transformer of --model_name, frozen, on `device`."""
    assert config.sae and config.model_name
    stack = load_sae_stack(config.sae, config.layers, dtype=torch.float32)
    check_one_per_block(stack)
    transformer = Transformer(
        config.model_name[0],
        max_length=config.data.max_length,
        batch_size=config.data.batch_size,
        device=device,
    )
    stack.requires_grad_(False)
    return StackReader(transformer, stack.to(device).eval())


def nonzero_latents(acts: Float[Tensor, "*batch d_sae"]) -> TopK:
    """The non-zero activations of each vector and their latents, `k` the most that one
    vector has (at least 1); the other entries hold value 0, which no metric counts."""
    k = max(1, int((acts != 0).sum(dim=-1).max()))
    indices = acts.abs().topk(k, dim=-1).indices
    return TopK(acts.gather(-1, indices), indices)


@torch.no_grad()
def run_layers(reader: StackReader, tokens: Int[Tensor, "batch pos"]) -> list[LayerBatch]:
    """Each SAE's targets, reconstructions and latents, in the stack's order (one forward
    pass of the transformer reads every site)."""
    layers = []
    for sae, read in zip(reader.stack, reader.read(tokens, targets=True), strict=True):
        recons = sae(read.inputs)
        layers.append(LayerBatch(read.targets, recons, nonzero_latents(sae.encode(read.inputs))))
    return layers


def counted_positions(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None
) -> Bool[Tensor, "batch pos"]:
    """The positions that count, as a mask (every one when `mask` is None)."""
    return torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask


@torch.no_grad()
def stack_spliced_losses(
    reader: StackReader,
    tokens: Int[Tensor, "batch pos"],
    layers: list[LayerBatch],
    mask: Bool[Tensor, "batch pos"] | None,
) -> dict[str, Float[Tensor, " layer"]]:
    """Per SAE, what `mlsae.lm.splice.spliced_metrics` gives per layer of an MLSAE: the
    model's own loss (`loss_true`), the loss with the reconstruction in place of the
    written site's activations at the positions that count (`loss_pred`), the logit MSE
    (`mse`) and KL divergence summed over a sequence's positions that count (`kl`) and
    per position that counts (`kl_per_token`)."""
    counted = counted_positions(tokens, mask)
    own = reader.transformer.model(input_ids=tokens, use_cache=False).logits
    loss_pred, mse, kl = [], [], []
    for position, layer in enumerate(layers):
        logits = reader.logits_with_replaced(tokens, position, layer.recons, counted)
        loss_pred.append(next_token_loss(logits, tokens, mask))
        mse.append(logit_mse(own, logits, mask))
        kl.append(logit_kldiv(own, logits, mask))
    kl_sums = torch.stack(kl)
    return {
        "loss_true": next_token_loss(own, tokens, mask).expand(len(layers)),
        "loss_pred": torch.stack(loss_pred),
        "mse": torch.stack(mse),
        "kl": kl_sums,
        "kl_per_token": kl_sums * tokens.shape[0] / counted.sum().clamp(min=1),
    }


@torch.no_grad()
def stack_ablated_losses(
    reader: StackReader,
    tokens: Int[Tensor, "batch pos"],
    layers: list[LayerBatch],
    mask: Bool[Tensor, "batch pos"] | None,
) -> dict[str, Float[Tensor, "*layer"]]:
    """Per SAE, what `mlsae.lm.splice.ablated_losses` gives per layer of an MLSAE: the
    loss with the written site's activations at the positions that count replaced by zeros
    (`loss_zero`) and by their mean there (`loss_mean`), both in the SAE's terms; and the
    number of predictions the losses average over (`n_predictions`, a scalar)."""
    counted = counted_positions(tokens, mask)
    losses: dict[str, list[Tensor]] = {"loss_zero": [], "loss_mean": []}
    for position, layer in enumerate(layers):
        mean = layer.targets[counted].mean(dim=0)
        for name, value in (("loss_zero", torch.zeros_like(mean)), ("loss_mean", mean)):
            replacement = value.expand_as(layer.targets)
            logits = reader.logits_with_replaced(tokens, position, replacement, counted)
            losses[name].append(next_token_loss(logits, tokens, mask))
    result = {name: torch.stack(values) for name, values in losses.items()}
    result["n_predictions"] = count_predictions(tokens, mask)
    return result


def dead_latents_share(
    stack: SAEStack, layers: list[LayerBatch], mask: Bool[Tensor, "batch pos"] | None
) -> float:
    """The share of the stack's latents (every SAE's) that fire in fewer than one per
    `DEAD_TOKENS_THRESHOLD` positions of the batch that count: `train/dead/rel`."""
    dead = 0
    for sae, layer in zip(stack, layers, strict=True):
        values, indices = layer.latents
        fires = values != 0 if mask is None else (values != 0) & mask[..., None]
        counted = values.shape[0] * values.shape[1] if mask is None else int(mask.sum())
        firings = torch.bincount(indices[fires], minlength=sae.d_sae)
        dead += int((firings < counted / DEAD_TOKENS_THRESHOLD).sum())
    return dead / sum(sae.d_sae for sae in stack)


class StackMetrics:
    """An MLSAE's metrics, one of each per SAE (as SAEs of different widths cannot share a
    tensor), and the means over batches of the values that an MLSAE's evaluation logs
    per batch."""

    def __init__(self, stack: SAEStack, widths: list[int], device: torch.device) -> None:
        self.layers = stack.layers
        self.per_batch = [
            inner_metrics(
                reconstruction_metrics(
                    [sae.layer], sae.d_sae, DEAD_TOKENS_THRESHOLD, FIRING_THRESHOLD
                ),
                spliced_metrics([sae.layer]),
                device=device,
            )
            for sae in stack
        ]
        self.whole = [
            inner_metrics(comparison_metrics([sae.layer], width, sae.d_sae), device=device)
            for sae, width in zip(stack, widths, strict=True)
        ]
        self.sums: dict[str, float] = defaultdict(float)
        self.batch_sizes = 0

    def update(
        self,
        layers: list[LayerBatch],
        mask: Bool[Tensor, "batch pos"] | None,
        spliced: dict[str, Tensor],
        ablated: dict[str, Tensor],
        dead_share: float,
    ) -> None:
        """Add one batch."""
        batch_size = layers[0].targets.shape[0]
        for index, layer in enumerate(layers):
            one = slice(index, index + 1)
            arguments = {
                "inputs": layer.targets[None],
                "recons": layer.recons[None],
                "values": layer.latents.values[None],
                "indices": layer.latents.indices[None],
                "mask": mask,
                "loss_true": spliced["loss_true"][one],
                "loss_pred": spliced["loss_pred"][one],
                "logit_mse": spliced["mse"][one],
                "logit_kldiv": spliced["kl"][one],
                "logit_kldiv_per_token": spliced["kl_per_token"][one],
                "loss_zero": ablated["loss_zero"][one],
                "loss_mean": ablated["loss_mean"][one],
                "n_predictions": ablated["n_predictions"],
            }
            for group, metric in self.per_batch[index].items():
                column = f"{group}/layer_{self.layers[index]}"
                self.sums[column] += float(metric(**arguments)) * batch_size
            for metric in self.whole[index].values():
                metric.update(**arguments)
        self.sums["train/dead/rel"] += dead_share * batch_size
        self.batch_sizes += batch_size

    def compute(self) -> dict[str, float]:
        """Every column: per layer, then averaged over layers."""
        if self.batch_sizes == 0:
            raise ConfigError(
                "no batch to evaluate: give --max_tokens of at least one batch "
                "(--batch_size x --max_length tokens) of data that holds that many"
            )
        metrics = {name: total / self.batch_sizes for name, total in self.sums.items()}
        for layer, whole in zip(self.layers, self.whole, strict=True):
            for group, metric in whole.items():
                metrics[f"{group}/layer_{layer}"] = float(metric.compute())
        return with_layer_averages(metrics)


def inner_metrics(*collections: MetricCollection, device: torch.device) -> dict[str, Metric]:
    """The layerwise metrics inside the per-layer wrappers of one-layer metric sets, by
    column group (`train/fvu`), on `device`; all but `train/dead/rel`, which counts every
    selected entry, and a stack's padding is no latent (`dead_latents_share` replaces it).
    The averages over layers are taken over the whole stack (`with_layer_averages`)."""
    return {
        group: wrapper.metric.to(device)
        for collection in collections
        for group, wrapper in collection.items()
        if group != "train/dead/rel"
    }


def with_layer_averages(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` and, for each group of `<group>/layer_<L>` columns, `<group>/avg`."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, value in metrics.items():
        group, _, last = name.rpartition("/")
        if last.startswith("layer_"):
            groups[group].append(value)
    averages = {f"{group}/avg": sum(values) / len(values) for group, values in groups.items()}
    return {**metrics, **averages}


def evaluation_device(accelerator: str) -> torch.device:
    """The device of `--accelerator` (cpu, gpu or auto)."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "gpu":
        return torch.device("cuda")
    return get_device()


def evaluate_stack(config: TestConfig) -> dict[str, float]:
    """The metrics of the stack of --sae over --model_name on the held-out data: an
    MLSAE's columns but its training losses (`loss/*`)."""
    device = evaluation_device(config.accelerator)
    reader = load_stack(config, device)
    transformer, stack = reader.transformer, reader.stack
    config_of_text = text_config(transformer.config)
    widths = [site_width(config_of_text, written_site(sae)) for sae in stack]
    metrics = StackMetrics(stack, widths, device)
    loader = held_out_stream(config.data, load_tokenizer(transformer.tokenizer))
    for batch in loader:
        tokens = batch["input_ids"].to(device)
        mask = None if config.count_special_tokens else ~transformer.special_token_mask(tokens)
        layers = run_layers(reader, tokens)
        spliced = stack_spliced_losses(reader, tokens, layers, mask)
        ablated = stack_ablated_losses(reader, tokens, layers, mask)
        metrics.update(layers, mask, spliced, ablated, dead_latents_share(stack, layers, mask))
    return metrics.compute()
