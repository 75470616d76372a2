"""The maths behind the explorer: one pretrained MLSAE, one prompt at a time.

`ExplorerService` tokenises a prompt, runs the transformer and the autoencoder once, and
keeps the result in a bounded LRU cache, so the many requests a page makes for one prompt
run the model once. Each intervention (a layer's reconstruction spliced in, a steered
residual stream) is one more forward pass, cached by its arguments.

Conventions:

- Layers are positions in the MLSAE's stack (0 .. n_layers - 1), never block indices.
- Activations are the autoencoder's top-k values after ReLU. The positions that the model
  leaves out (special tokens, unless the checkpoint counts them) show 0.
- Reconstruction: the residual stream after the layer's block is replaced by the
  autoencoder's reconstruction (in the transformer's space) at the positions that count,
  and the model runs the rest. Changes are relative to the model's own logits.
- Steering: `factor * std * d` is added to the residual stream after the layer's block,
  where `d` is the latent's unit-norm decoder column and `std` the standard deviation
  that standardisation removed at that position (1 without standardisation), so
  `factor` is the change in the latent's contribution in the autoencoder's space
  (comparable to its activations). With a tuned lens the step is mapped back through
  the lens's inverse. Special positions are not steered.
- KL divergences are KL(intervened || model's own), per position, in nats.
"""

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mlsae.analysis.examples import Example as StoredExample
from mlsae.analysis.examples import Examples
from mlsae.model.autoencoder import standardize
from mlsae.model.lightning import MLSAETransformer, ResidualStream
from mlsae.model.losses import layerwise_mse_and_var

from . import schemas

T = TypeVar("T")

_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_UNBOUNDED_TOKENIZER = 10**9


class ExplorerInputError(ValueError):
    """A request that is well-formed but does not fit the model (answered with 422)."""

    status_code = 422


class NotAvailableError(LookupError):
    """The server lacks what the request needs (answered with 404)."""

    status_code = 404


class LRUCache:
    """At most `maxsize` values, the least recently used evicted first."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = compute()
        self._items[key] = value
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()


@dataclass(frozen=True)
class PromptAnalysis:
    """What one forward pass of the transformer and the autoencoder gives for a prompt."""

    token_ids: Int[Tensor, "1 pos"]
    special: Bool[Tensor, " pos"]
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


class ExamplesReader:
    """An examples database, opened once per thread (sqlite connections are per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no examples database at {self.path}")
        self._local = threading.local()

    def get(self, layer: int, latent: int) -> list[StoredExample]:
        examples = getattr(self._local, "examples", None)
        if examples is None:
            examples = self._local.examples = Examples(self.path)
        return examples.get(layer, latent)


def open_examples(
    examples: "Examples | ExamplesReader | str | Path | None",
) -> ExamplesReader | None:
    if examples is None or isinstance(examples, ExamplesReader):
        return examples
    if isinstance(examples, Examples):
        return ExamplesReader(examples.path)
    return ExamplesReader(examples)


def context_length(model: MLSAETransformer) -> int:
    """The most tokens the transformer takes: its position limit, else the tokenizer's,
    else the MLSAE's training length."""
    config = model.transformer.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    tokenizer_limit = getattr(model.transformer.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _UNBOUNDED_TOKENIZER:
        return tokenizer_limit
    return model.max_length


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class ExplorerService:
    """Prompt analyses of one `MLSAETransformer`, cached. Thread-safe: one request at a
    time uses the model."""

    def __init__(
        self,
        model: MLSAETransformer,
        examples: "Examples | ExamplesReader | str | Path | None" = None,
        *,
        repo_id: str | None = None,
        cache_size: int = 8,
        results_cache_size: int = 256,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: The pretrained MLSAE and its transformer (put in eval mode here).
            examples: The top activating examples: an `Examples`, or the path of its
                SQLite database; None serves none.
            repo_id: Where the model came from, for the parameters.
            cache_size: How many prompts' forward passes are kept.
            results_cache_size: How many derived results (logits, interventions,
                metrics) are kept.
            max_prompt_tokens: The longest prompt, in tokens (default and at most: the
                transformer's context length).
        """
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.transformer = model.transformer
        self.tokenizer = model.transformer.tokenizer
        self.examples = open_examples(examples)
        self.repo_id = repo_id
        self.n_layers = model.n_layers
        self.n_latents = model.n_latents
        self.k = model.k
        context = context_length(model)
        self.max_prompt_tokens = min(max_prompt_tokens or context, context)
        self.analyses = LRUCache(cache_size)
        self.results = LRUCache(results_cache_size)
        self._lock = threading.RLock()
        self._token_texts: dict[int, str] = {}

    # Validation and tokens -----------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ExplorerInputError(
                f"layer must be in [0, {self.n_layers}) (positions in the stack of "
                f"{self.n_layers} layers), not {layer}"
            )
        return layer

    def check_latent(self, latent: int) -> int:
        if not 0 <= latent < self.n_latents:
            raise ExplorerInputError(f"latent must be in [0, {self.n_latents}), not {latent}")
        return latent

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, checked against the context length."""
        if not prompt:
            raise ExplorerInputError("prompt must not be empty")
        ids = self.tokenizer(prompt, verbose=False)["input_ids"]
        if not ids:
            raise ExplorerInputError("prompt has no tokens")
        if len(ids) > self.max_prompt_tokens:
            raise ExplorerInputError(
                f"prompt is {len(ids)} tokens long; at most {self.max_prompt_tokens} fit "
                "the model's context"
            )
        return ids

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            with self._lock:  # a fast tokenizer must not be used by two threads at once
                text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def tokens(self, prompt: str) -> list[schemas.Token]:
        with self._lock:
            ids = self.token_ids(prompt)
            special = set(self.transformer.special_token_ids)
            return [
                schemas.Token(
                    pos=pos,
                    id=token_id,
                    token=self.token_text(token_id),
                    special=token_id in special,
                )
                for pos, token_id in enumerate(ids)
            ]

    def params(self) -> schemas.Params:
        model = self.model
        return schemas.Params(
            repo_id=self.repo_id,
            model_name=model.model_name,
            n_layers=self.n_layers,
            blocks=list(model.layers),
            n_latents=self.n_latents,
            d_model=model.n_inputs,
            k=self.k,
            vocab_size=int(self.transformer.model.get_output_embeddings().weight.shape[0]),
            max_prompt_tokens=self.max_prompt_tokens,
            standardize=model.standardize,
            tuned_lens=model.lens is not None,
            examples_available=self.examples is not None,
            hparams=dict(model.hparams_initial),
        )

    # The cached forward pass ---------------------------------------------------------

    def analyse(self, prompt: str) -> PromptAnalysis:
        """The prompt's forward pass, from the cache when it is there."""
        with self._lock:
            return self.analyses.get_or_compute(prompt, lambda: self._analyse(prompt))

    @torch.no_grad()
    def _analyse(self, prompt: str) -> PromptAnalysis:
        model = self.model
        token_ids = torch.tensor([self.token_ids(prompt)], device=model.device)
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
            else self.transformer.special_token_mask(token_ids)[0]
        )
        values = output.topk.values[:, 0].masked_fill(~counted[None, :, None], 0.0)
        return PromptAnalysis(
            token_ids=token_ids,
            special=special,
            counted=counted,
            stream=stream,
            values=values,
            indices=output.topk.indices[:, 0],
            recons=model.to_transformer_space(output.recons),
        )

    def _cached(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            return self.results.get_or_compute(key, compute)

    # Latents -------------------------------------------------------------------------

    def activations(self, prompt: str, top_k: int | None = None) -> schemas.Activations:
        top_k = self.k if top_k is None else top_k
        if not 1 <= top_k <= self.k:
            raise ExplorerInputError(f"top_k must be in [1, {self.k}] (the model's k)")
        analysis = self.analyse(prompt)
        values, order = analysis.values.sort(dim=-1, descending=True)
        latents = analysis.indices.gather(-1, order)
        top = [
            [
                [
                    schemas.LatentActivation(latent=latent, act=act)
                    for latent, act in zip(position_latents, position_values, strict=True)
                    if act > 0
                ]
                for position_latents, position_values in zip(
                    layer_latents, layer_values, strict=True
                )
            ]
            for layer_latents, layer_values in zip(
                latents[..., :top_k].tolist(), values[..., :top_k].tolist(), strict=True
            )
        ]
        return schemas.Activations(tokens=self.tokens(prompt), max=values[..., 0].tolist(), top=top)

    def dense_activations(self, prompt: str) -> Float[Tensor, "layer pos n_latents"]:
        analysis = self.analyse(prompt)
        dense = analysis.values.new_zeros((self.n_layers, analysis.n_positions, self.n_latents))
        return dense.scatter_(-1, analysis.indices, analysis.values)

    def latent(self, prompt: str, latent: int) -> schemas.LatentTrace:
        self.check_latent(latent)
        analysis = self.analyse(prompt)
        acts = torch.where(analysis.indices == latent, analysis.values, 0.0).sum(-1)
        weights = acts.sum(-1)
        total = float(weights.sum())
        layer_mean = None
        if total > 0:
            layers = torch.arange(self.n_layers, dtype=weights.dtype, device=weights.device)
            layer_mean = float((weights * layers).sum()) / total
        return schemas.LatentTrace(
            latent=latent, acts=acts.tolist(), max=float(acts.max()), layer_mean=layer_mean
        )

    def histograms(self, prompt: str, bins: int = 32) -> schemas.Histograms:
        analysis = self.analyse(prompt)
        counted = analysis.values[:, analysis.counted]
        top = max(float(counted.max()) if counted.numel() else 0.0, 1e-6)
        counts, zeros = [], []
        for layer_values in counted:
            firing = layer_values[layer_values > 0]
            counts.append(torch.histc(firing, bins=bins, min=0.0, max=top).long().tolist())
            zeros.append(int(layer_values.numel() - firing.numel()))
        edges = torch.linspace(0.0, top, bins + 1).tolist()
        return schemas.Histograms(edges=edges, counts=counts, zeros=zeros)

    # Metrics -------------------------------------------------------------------------

    def metrics(self, prompt: str) -> schemas.Metrics:
        return self._cached(("metrics", prompt), lambda: self._metrics(prompt))

    @torch.no_grad()
    def _metrics(self, prompt: str) -> schemas.Metrics:
        model, analysis = self.model, self.analyse(prompt)
        stream = analysis.stream
        output = model.autoencoder(stream.inputs)
        mse, var = layerwise_mse_and_var(stream.inputs, output.recons, stream.mask)
        fired = (analysis.values > model.dead_threshold).sum(-1).float()
        n_counted = int(analysis.counted.sum())
        l0 = fired[:, analysis.counted].mean(-1) if n_counted else torch.full_like(mse, math.nan)
        spliced = model.spliced_metrics(analysis.token_ids, stream, analysis.recons)
        kl_per_position = spliced["kl"] / max(n_counted, 1)
        own_loss = float(spliced["loss_true"][0]) if analysis.n_positions > 1 else math.nan
        layers = []
        for layer in range(self.n_layers):
            loss = float(spliced["loss_pred"][layer]) if analysis.n_positions > 1 else math.nan
            layers.append(
                schemas.LayerMetrics(
                    layer=layer,
                    block=model.layers[layer],
                    fvu=_finite_or_none(float(mse[layer] / var[layer])),
                    mse=_finite_or_none(float(mse[layer])),
                    l0=_finite_or_none(float(l0[layer])),
                    loss=_finite_or_none(loss),
                    loss_delta=_finite_or_none(loss - own_loss),
                    kl_div=_finite_or_none(float(kl_per_position[layer])),
                )
            )
        return schemas.Metrics(n_tokens=n_counted, loss=_finite_or_none(own_loss), layers=layers)

    def training_metrics(self, prompt: str) -> dict[str, float | None]:
        """The model's training metrics (`train/fvu/layer_0`, ...) on the prompt."""
        return self._cached(("training-metrics", prompt), lambda: self._training_metrics(prompt))

    @torch.no_grad()
    def _training_metrics(self, prompt: str) -> dict[str, float | None]:
        model, analysis = self.model, self.analyse(prompt)
        output = model.autoencoder(analysis.inputs)
        metrics = model.train_metrics.clone()
        metrics.reset()
        values = metrics(
            inputs=analysis.inputs,
            recons=output.recons,
            values=output.topk.values,
            indices=output.topk.indices,
            mask=analysis.stream.mask,
        )
        return {name: _finite_or_none(float(value)) for name, value in values.items()}

    # Logits --------------------------------------------------------------------------

    def top_logits(self, prompt: str, top_n: int = 10) -> schemas.TopLogits:
        return self._cached(("logits", prompt, top_n), lambda: self._top_logits(prompt, top_n))

    @torch.no_grad()
    def _top_logits(self, prompt: str, top_n: int) -> schemas.TopLogits:
        analysis = self.analyse(prompt)
        logits = self.transformer.model(input_ids=analysis.token_ids, use_cache=False).logits
        return schemas.TopLogits(top=self._largest_logits(logits[0].float(), top_n))

    def reconstruction(self, prompt: str, layer: int, top_n: int = 10) -> schemas.LogitChanges:
        self.check_layer(layer)
        return self._cached(
            ("recon", prompt, layer, top_n), lambda: self._reconstruction(prompt, layer, top_n)
        )

    def _reconstruction(self, prompt: str, layer: int, top_n: int) -> schemas.LogitChanges:
        analysis = self.analyse(prompt)
        spliced = torch.where(analysis.mask[None, :, :, None], analysis.recons, analysis.raw)
        return self._intervene(analysis, layer, spliced, top_n)

    def steering(
        self,
        prompt: str,
        latent: int,
        layer: int,
        factor: float,
        positions: list[int] | None = None,
        top_n: int = 10,
    ) -> schemas.LogitChanges:
        self.check_layer(layer)
        self.check_latent(latent)
        if not math.isfinite(factor):
            raise ExplorerInputError("factor must be a finite number")
        analysis = self.analyse(prompt)
        if positions is not None:
            outside = [pos for pos in positions if not 0 <= pos < analysis.n_positions]
            if outside:
                raise ExplorerInputError(
                    f"positions must be in [0, {analysis.n_positions}), not {outside[:5]}"
                )
            positions = sorted(set(positions))
        chosen = None if positions is None else tuple(positions)
        key = ("steer", prompt, latent, layer, factor, chosen, top_n)
        return self._cached(
            key, lambda: self._steering(analysis, latent, layer, factor, positions, top_n)
        )

    @torch.no_grad()
    def _steering(
        self,
        analysis: PromptAnalysis,
        latent: int,
        layer: int,
        factor: float,
        positions: list[int] | None,
        top_n: int,
    ) -> schemas.LogitChanges:
        model = self.model
        steered_positions = analysis.counted.clone()
        if positions is not None:
            chosen = torch.zeros_like(steered_positions)
            chosen[positions] = True
            steered_positions &= chosen
        inputs = analysis.inputs
        scale = (
            standardize(inputs)[1].std if model.standardize else torch.ones_like(inputs[..., :1])
        )
        direction = model.autoencoder.decoder.weight[:, latent].to(inputs.dtype)
        in_layer = torch.zeros(self.n_layers, dtype=torch.bool, device=inputs.device)
        in_layer[layer] = True
        where = in_layer[:, None, None, None] & steered_positions[None, None, :, None]
        step = torch.where(where, factor * scale * direction, 0.0)
        if model.lens is None:
            steered = analysis.raw + step
        else:
            shift = model.to_transformer_space(inputs + step) - model.to_transformer_space(inputs)
            steered = analysis.raw + torch.where(where, shift, 0.0)
        return self._intervene(analysis, layer, steered, top_n)

    @torch.no_grad()
    def _intervene(
        self,
        analysis: PromptAnalysis,
        layer: int,
        modified: Float[Tensor, "layer 1 pos d_model"],
        top_n: int,
    ) -> schemas.LogitChanges:
        """The model's own logits against those with `modified[layer]` spliced in, both
        from one forward pass: splicing the unmodified stream gives the model's own."""
        stack = torch.cat([analysis.raw, modified], dim=1)
        tokens = analysis.token_ids.expand(2, -1)
        logits = self.transformer.forward_at_layer(stack, layer, "logits", tokens).float()
        own, after = logits[0], logits[1]
        change = after - own
        log_own, log_after = F.log_softmax(own, -1), F.log_softmax(after, -1)
        kl_div = (log_after.exp() * (log_after - log_own)).sum(-1).clamp(min=0.0)
        return schemas.LogitChanges(
            layer=layer,
            block=self.model.layers[layer],
            top=self._largest_logits(after, top_n),
            increased=self._largest_changes(change, top_n, largest=True),
            decreased=self._largest_changes(change, top_n, largest=False),
            kl_div=kl_div.tolist(),
        )

    def _largest_logits(self, logits: Float[Tensor, "pos vocab"], top_n: int) -> list:
        top_n = min(top_n, logits.shape[-1])
        probs = logits.softmax(-1)
        values, ids = logits.topk(top_n, dim=-1)
        chosen_probs = probs.gather(-1, ids)
        return [
            [
                schemas.Logit(id=token_id, token=self.token_text(token_id), logit=value, prob=prob)
                for token_id, value, prob in zip(*row, strict=True)
            ]
            for row in zip(ids.tolist(), values.tolist(), chosen_probs.tolist(), strict=True)
        ]

    def _largest_changes(
        self, change: Float[Tensor, "pos vocab"], top_n: int, largest: bool
    ) -> list:
        top_n = min(top_n, change.shape[-1])
        values, ids = change.topk(top_n, dim=-1, largest=largest)
        return [
            [
                schemas.Logit(id=token_id, token=self.token_text(token_id), logit=value)
                for token_id, value in zip(row_ids, row_values, strict=True)
            ]
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]

    # Examples ------------------------------------------------------------------------

    def latent_examples(self, layer: int, latent: int, limit: int | None = None) -> list:
        """The latent's top examples at a layer, tokens decoded one by one."""
        self.check_layer(layer)
        self.check_latent(latent)
        if self.examples is None:
            raise NotAvailableError(
                "this server has no examples database: start it with --examples, or run "
                "`python -m mlsae.analysis.examples --repo_id ...` first"
            )
        rows = self.examples.get(layer, latent)
        return [
            schemas.Example(
                latent=row.latent,
                layer=row.layer,
                token_id=row.token_id,
                token=self.token_text(row.token_id),
                act=row.act,
                token_ids=row.token_ids,
                tokens=[self.token_text(token_id) for token_id in row.token_ids],
                acts=row.acts,
            )
            for row in rows[:limit]
        ]

    def examples_by_layer(
        self, latent: int, layer: int | None = None, limit: int = 32
    ) -> schemas.ExamplesResponse:
        self.check_latent(latent)
        layers = range(self.n_layers) if layer is None else [self.check_layer(layer)]
        if self.examples is None:
            return schemas.ExamplesResponse(latent=latent, available=False, layers=[])
        return schemas.ExamplesResponse(
            latent=latent,
            available=True,
            layers=[
                schemas.LayerExamples(
                    layer=layer, examples=self.latent_examples(layer, latent, limit)
                )
                for layer in layers
            ],
        )
