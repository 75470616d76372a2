"""One prompt through a pretrained MLSAE, or a stack of per-layer SAEs: the analysis that
the explorer serves and that `mlsae.analysis.heatmaps` writes.

`analyse_prompt(model, prompt)` tokenises the prompt (at most the transformer's context
length), runs the transformer and the autoencoder once, and keeps what every question about
the prompt needs (`PromptAnalysis`). The functions here answer those questions from it
without running the autoencoder again: the latents (dense, sorted, one latent's trace,
histograms), the metrics (`prompt_metrics`, `training_metrics`) and the interventions
(`mlsae.analysis.interventions`: a reconstruction or a steered residual stream spliced in).

Conventions:

- Layers are positions in the MLSAE's stack (0 .. n_layers - 1), never block indices.
- Activations are the autoencoder's top-k values after ReLU. The positions that the model
  leaves out (special tokens, unless the checkpoint counts them) show 0.
- Metrics are those of `mlsae.metrics`, on the positions that count: FVU and MSE compare
  the autoencoder's inputs with its reconstructions in its own space (after the tuned
  lens, if any); L0 counts the activations above the model's dead threshold.
- A stack of per-layer SAEs (`StackSource`) gives each layer's latents from that layer's
  SAE, at its own site, after its activation function (`mlsae.analysis.stack_prompt`);
  L0 counts its non-zero activations.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric

from mlsae.analysis.source import StackSource
from mlsae.analysis.stack_prompt import run_stack, stack_spliced_metrics
from mlsae.cli import UserError
from mlsae.metrics import LayerwiseFVU, LayerwiseL0Norm, LayerwiseMSE, layer_mean
from mlsae.model.autoencoder import standardize
from mlsae.model.lightning import MLSAETransformer, ResidualStream

PromptModel = MLSAETransformer | StackSource
"""What analyses a prompt: a pretrained MLSAE, or a stack of per-layer SAEs."""


class PromptError(UserError, ValueError):
    """A prompt or a request about it that the model cannot answer: an empty prompt, text
    that is not Unicode, more tokens than fit, a layer or latent out of range."""


@dataclass(frozen=True)
class PromptAnalysis:
    """What one forward pass of the transformer and the autoencoder gives for a prompt."""

    token_ids: Int[Tensor, "1 pos"]
    special: Bool[Tensor, " pos"]
    """The BOS/EOS/PAD positions."""
    counted: Bool[Tensor, " pos"]
    """The positions that count (all but special ones, unless the model counts them)."""
    stream: ResidualStream
    """The residual stream after each layer's block (`raw`, in the transformer's space)
    and what the autoencoder encoded (`inputs`)."""
    values: Float[Tensor, "layer pos k"]
    """The selected activations after ReLU, 0 at positions that do not count."""
    indices: Int[Tensor, "layer pos k"]
    recons: Float[Tensor, "layer 1 pos d_model"]
    """The reconstructions in the transformer's space."""
    encoded_recons: Float[Tensor, "layer 1 pos d_model"]
    """The reconstructions in the autoencoder's space, which the metrics compare with
    `inputs` (the same tensor as `recons` without a tuned lens)."""
    scale: Float[Tensor, "layer 1 pos 1"]
    """The standard deviation that standardisation removed from each input vector (1
    without standardisation): a unit of the autoencoder's space in the inputs' space."""

    @property
    def n_positions(self) -> int:
        return self.token_ids.shape[1]

    @property
    def raw(self) -> Float[Tensor, "layer 1 pos d_model"]:
        return self.stream.raw

    @property
    def inputs(self) -> Float[Tensor, "layer 1 pos d_model"]:
        return self.stream.inputs

    @property
    def mask(self) -> Bool[Tensor, "1 pos"]:
        return self.counted[None]


# Tokens -------------------------------------------------------------------------------------


def longest_prompt(model: PromptModel) -> int:
    """The most tokens a prompt may have: the transformer's context length, or the length
    the MLSAE was trained on where the transformer does not say."""
    context = model.transformer.context_length
    return context if context is not None else model.max_length


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone UTF-16 surrogate, which JSON can spell as
    `"\\udcff"`), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"is not valid Unicode: character {error.start} is a lone surrogate"
    return None


def prompt_token_ids(model: PromptModel, prompt: str, max_tokens: int | None = None) -> list[int]:
    """The token ids of `prompt`, at most `max_tokens` of them (default: `longest_prompt`);
    a `PromptError` that says what is wrong otherwise. Error messages never repeat the
    prompt."""
    if not prompt:
        raise PromptError("the prompt is empty")
    problem = unicode_problem(prompt)
    if problem:
        raise PromptError(f"the prompt {problem}")
    token_ids = model.transformer.tokenizer(prompt, verbose=False)["input_ids"]
    if not token_ids:
        raise PromptError("the prompt has no tokens")
    limit = longest_prompt(model) if max_tokens is None else max_tokens
    if len(token_ids) > limit:
        raise PromptError(
            f"the prompt has {len(token_ids)} tokens, more than the {limit} that fit the "
            "model's context: shorten it"
        )
    return token_ids


def check_layer(model: PromptModel, layer: int) -> int:
    """`layer`, if it is a position in the model's stack; a `PromptError` otherwise."""
    if not 0 <= layer < model.n_layers:
        raise PromptError(
            f"layer must be in [0, {model.n_layers}) (positions in the stack of "
            f"{model.n_layers} layers), not {layer}"
        )
    return layer


def check_latent(model: PromptModel, latent: int) -> int:
    """`latent`, if the model has it; a `PromptError` otherwise."""
    if not 0 <= latent < model.n_latents:
        raise PromptError(f"latent must be in [0, {model.n_latents}), not {latent}")
    return latent


# The forward pass ---------------------------------------------------------------------------


def analyse_prompt(
    model: PromptModel, prompt: str, max_tokens: int | None = None
) -> PromptAnalysis:
    """The analysis of `prompt` (see `prompt_token_ids` for `max_tokens`)."""
    token_ids = torch.tensor([prompt_token_ids(model, prompt, max_tokens)], device=model.device)
    return analyse_tokens(model, token_ids)


@torch.no_grad()
def analyse_tokens(model: PromptModel, token_ids: Int[Tensor, "1 pos"]) -> PromptAnalysis:
    """The transformer's residual stream and the autoencoder's output for one sequence."""
    token_ids = token_ids.to(model.device)
    if isinstance(model, StackSource):
        return analyse_stack_tokens(model, token_ids)
    stream = model.residual_stream(token_ids)
    output = model.autoencoder(stream.inputs)
    n_positions = token_ids.shape[1]
    counted = (
        stream.mask[0]
        if stream.mask is not None
        else torch.ones(n_positions, dtype=torch.bool, device=token_ids.device)
    )
    special = (
        stream.special[0]
        if stream.special is not None
        else model.transformer.special_token_mask(token_ids)[0]
    )
    inputs = stream.inputs
    scale = standardize(inputs)[1].std if model.standardize else torch.ones_like(inputs[..., :1])
    return PromptAnalysis(
        token_ids=token_ids,
        special=special,
        counted=counted,
        stream=stream,
        values=output.topk.values[:, 0].masked_fill(~counted[None, :, None], 0.0),
        indices=output.topk.indices[:, 0],
        recons=model.to_transformer_space(output.recons),
        encoded_recons=output.recons,
        scale=scale,
    )


def analyse_stack_tokens(source: StackSource, token_ids: Int[Tensor, "1 pos"]) -> PromptAnalysis:
    """Each SAE's activations, latents and reconstruction for one sequence (`stream.raw`
    and `stream.inputs` are both what the SAEs read, unmasked)."""
    stack_pass = run_stack(source, token_ids)
    special = source.transformer.special_token_mask(token_ids)
    mask = source.mask(token_ids)
    counted = mask[0] if mask is not None else torch.ones_like(special[0])
    activations, recons = stack_pass.activations, stack_pass.recons
    return PromptAnalysis(
        token_ids=token_ids,
        special=special[0],
        counted=counted,
        stream=ResidualStream(activations, activations, mask, special),
        values=stack_pass.topk.values[:, 0].masked_fill(~counted[None, :, None], 0.0),
        indices=stack_pass.topk.indices[:, 0],
        recons=recons,
        encoded_recons=recons,
        scale=torch.ones_like(activations[..., :1]),
    )


# Latents ------------------------------------------------------------------------------------


def dense_activations(
    analysis: PromptAnalysis, n_latents: int
) -> Float[Tensor, "layer pos n_latents"]:
    """Every latent's activation at each layer and position (0 where not selected)."""
    n_layers = analysis.values.shape[0]
    dense = analysis.values.new_zeros((n_layers, analysis.n_positions, n_latents))
    return dense.scatter_(-1, analysis.indices, analysis.values)


def sorted_activations(
    analysis: PromptAnalysis,
) -> tuple[Float[Tensor, "layer pos k"], Int[Tensor, "layer pos k"]]:
    """The selected activations at each layer and position in descending order, and
    their latents."""
    values, order = analysis.values.sort(dim=-1, descending=True)
    return values, analysis.indices.gather(-1, order)


def latent_activations(analysis: PromptAnalysis, latent: int) -> Float[Tensor, "layer pos"]:
    """One latent's activation at each layer and position (0 where not selected)."""
    return torch.where(analysis.indices == latent, analysis.values, 0.0).sum(-1)


def mean_layer(activations: Float[Tensor, "*latent layer pos"]) -> Float[Tensor, " *latent"]:
    """The mean layer of each latent, weighted by its activation summed over positions
    (NaN for a latent that never fires)."""
    return layer_mean(activations.sum(-1), dim=-1)


@dataclass(frozen=True)
class Histograms:
    """Per layer, a histogram of activations, with bins shared by every layer."""

    edges: Float[Tensor, " edge"]
    """`bins + 1` edges from 0 to the largest activation."""
    counts: Int[Tensor, "layer bin"]
    zeros: Int[Tensor, " layer"]
    """Per layer, how many of the activations are 0."""


def activation_histograms(analysis: PromptAnalysis, bins: int) -> Histograms:
    """Per layer, a histogram of the nonzero selected activations at the positions that
    count; `zeros` counts the selections that are 0 after ReLU."""
    counted = analysis.values[:, analysis.counted]
    return _histograms([layer[layer > 0] for layer in counted], counted, bins)


def dense_histograms(analysis: PromptAnalysis, n_latents: int, bins: int) -> Histograms:
    """Per layer, a histogram of every latent's activation at every position, zeros
    included (as the original drew them)."""
    dense = dense_activations(analysis, n_latents)
    return _histograms(list(dense.flatten(1)), dense, bins)


def _histograms(per_layer: list[Tensor], everything: Tensor, bins: int) -> Histograms:
    """Histograms of `per_layer`, the values to count at each layer, from 0 to the largest
    of `everything` (`[layer, ...]`), whose zeros are counted apart."""
    top = max(float(everything.max()) if everything.numel() else 0.0, 1e-6)
    counts = torch.stack(
        [torch.histc(values.float(), bins=bins, min=0.0, max=top).long() for values in per_layer]
    )
    zeros = (everything == 0).flatten(1).sum(-1)
    return Histograms(torch.linspace(0.0, top, bins + 1), counts.cpu(), zeros.cpu())


# Metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptMetrics:
    """Per layer, how well the autoencoder does on the prompt; NaN where undefined (no
    next-token loss for a one-token prompt, nothing without positions that count)."""

    n_counted: int
    """The positions that count."""
    own_loss: float
    """The model's own next-token cross-entropy, in nats."""
    fvu: Float[Tensor, " layer"]
    mse: Float[Tensor, " layer"]
    l0: Float[Tensor, " layer"]
    loss: Float[Tensor, " layer"]
    """The next-token cross-entropy with the layer's reconstruction spliced in."""
    loss_delta: Float[Tensor, " layer"]
    """`loss` minus `own_loss`."""
    kl_div: Float[Tensor, " layer"]
    """KL(spliced || model's own) of the next-token distributions, per position."""


def _metric_batch(analysis: PromptAnalysis) -> dict[str, Tensor | None]:
    """The prompt as the arguments of a metric of `mlsae.metrics` (a batch of one)."""
    return {
        "inputs": analysis.inputs,
        "recons": analysis.encoded_recons,
        "values": analysis.values[:, None],
        "indices": analysis.indices[:, None],
        "mask": analysis.stream.mask,
    }


def _computed(metric: Metric, analysis: PromptAnalysis) -> Tensor:
    metric = metric.to(analysis.inputs.device)
    metric.update(**_metric_batch(analysis))
    return metric.compute().float().cpu()


@torch.no_grad()
def prompt_metrics(model: PromptModel, analysis: PromptAnalysis) -> PromptMetrics:
    """Per layer: FVU, MSE, L0 and, with the layer's reconstruction spliced in, the
    next-token loss and the KL divergence from the model's own predictions."""
    n_layers = model.n_layers
    if isinstance(model, StackSource):
        spliced = stack_spliced_metrics(model, analysis.token_ids, analysis.stream, analysis.recons)
    else:
        spliced = model.spliced_metrics(analysis.token_ids, analysis.stream, analysis.recons)
    n_counted = int(analysis.counted.sum())
    nan = torch.full((n_layers,), torch.nan)
    predicts = analysis.n_positions > 1  # a next token to predict
    own_loss = float(spliced["loss_true"][0]) if predicts else float("nan")
    loss = spliced["loss_pred"].float().cpu() if predicts else nan
    return PromptMetrics(
        n_counted=n_counted,
        own_loss=own_loss,
        fvu=_computed(LayerwiseFVU(n_layers), analysis),
        mse=_computed(LayerwiseMSE(n_layers), analysis),
        l0=_computed(LayerwiseL0Norm(n_layers, firing_threshold(model)), analysis),
        loss=loss,
        loss_delta=loss - own_loss,
        kl_div=spliced["kl_per_token"].float().cpu(),
    )


def firing_threshold(model: PromptModel) -> float:
    """The activation above which L0 counts a latent: the MLSAE's dead threshold; 0 for a
    stack, whose activations are after the SAEs' activation functions."""
    return 0.0 if isinstance(model, StackSource) else model.dead_threshold


@torch.no_grad()
def training_metrics(model: PromptModel, analysis: PromptAnalysis) -> dict[str, float]:
    """The model's training metrics (`train/fvu/layer_0`, ..., `train/dead/rel`) on the
    prompt; for a stack, its FVU, MSE and L0 per layer under those names."""
    if isinstance(model, StackSource):
        metrics = {
            "fvu": LayerwiseFVU(model.n_layers),
            "mse": LayerwiseMSE(model.n_layers),
            "l0": LayerwiseL0Norm(model.n_layers, firing_threshold(model)),
        }
        return {
            f"train/{name}/layer_{layer}": float(value)
            for name, metric in metrics.items()
            for layer, value in enumerate(_computed(metric, analysis).tolist())
        }
    metrics = model.train_metrics.clone()
    metrics.reset()
    values = metrics(**_metric_batch(analysis))
    return {name: float(value) for name, value in values.items()}
