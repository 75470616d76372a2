"""The maths behind the explorer: one pretrained MLSAE, one prompt at a time.

`ExplorerService` tokenises a prompt, runs the transformer and the autoencoder once, and
keeps the result in an LRU cache bounded by count and by bytes, so the many requests a page
makes for one prompt run the model once. Each intervention (a layer's reconstruction
spliced in, a steered residual stream) is one more forward pass, cached by its arguments
in a second such cache, compactly: the top entries per position, not the dense logits.

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

import logging
import math
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from mlsae.analysis.examples import Examples
from mlsae.model.lightning import MLSAETransformer

from . import schemas
from .cache import LRUCache
from .examples_reader import ExamplesReader, open_examples
from .logits import (
    LogitComparison,
    TopEntries,
    compare_logits,
    largest_logits,
    logit_changes,
    logit_rows,
)
from .prompt import (
    PromptAnalysis,
    activation_histograms,
    analyse_tokens,
    context_length,
    latent_trace,
    prompt_metrics,
    reconstructed_stream,
    steered_stream,
    training_metrics,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 512 * 2**20
"""What the two caches together may hold by default."""


class ExplorerInputError(ValueError):
    """A request that is well-formed but does not fit the model (answered with 422)."""

    status_code = 422


class NotAvailableError(LookupError):
    """The server lacks what the request needs (answered with 404)."""

    status_code = 404


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
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: The pretrained MLSAE and its transformer (put in eval mode here).
            examples: The top activating examples: an `Examples`, or the path of its
                SQLite database; None serves none.
            repo_id: Where the model came from, for the parameters.
            cache_size: How many prompts' forward passes are kept, at most.
            results_cache_size: How many derived results (logits, interventions,
                metrics) are kept, at most.
            cache_bytes: What the caches may hold in all: three quarters for the forward
                passes, one quarter for the derived results. Tensors count wherever they
                live (GPU memory for a model on a GPU). A forward pass larger than its
                share is computed for every request instead of kept.
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
        results_bytes = cache_bytes // 4
        self.analyses = LRUCache(cache_size, max_bytes=cache_bytes - results_bytes)
        self.results = LRUCache(results_cache_size, max_bytes=results_bytes)
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
        problem = schemas.unicode_problem(prompt)
        if problem:
            raise ExplorerInputError(f"prompt {problem}")
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
            return self._get_or_compute(self.analyses, prompt, lambda: self._analyse(prompt))

    def _analyse(self, prompt: str) -> PromptAnalysis:
        token_ids = torch.tensor([self.token_ids(prompt)], device=self.model.device)
        return analyse_tokens(self.model, token_ids)

    def _cached(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            return self._get_or_compute(self.results, key, compute)

    def _get_or_compute(self, cache: LRUCache, key: Hashable, compute: Callable[[], T]) -> T:
        first_too_large = cache.too_large == 0
        value = cache.get_or_compute(key, compute)
        if first_too_large and cache.too_large:
            logger.warning(
                "an entry of %.1f MB does not fit the cache's %.1f MB and is recomputed for "
                "every request: give the explorer more cache (--cache_mb)",
                cache.sizeof(key, value) / 1e6,
                cache.max_bytes / 1e6,
            )
        return value

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
        return latent_trace(self.analyse(prompt), self.check_latent(latent))

    def histograms(self, prompt: str, bins: int = 32) -> schemas.Histograms:
        return activation_histograms(self.analyse(prompt), bins)

    # Metrics -------------------------------------------------------------------------

    def metrics(self, prompt: str) -> schemas.Metrics:
        """Per layer: FVU, MSE, L0, and the spliced next-token loss and KL divergence."""
        dumped = self._cached(
            ("metrics", prompt),
            lambda: prompt_metrics(self.model, self.analyse(prompt)).model_dump(),
        )
        return schemas.Metrics.model_validate(dumped)

    def training_metrics(self, prompt: str) -> dict[str, float | None]:
        """The model's training metrics (`train/fvu/layer_0`, ...) on the prompt."""
        return dict(
            self._cached(
                ("training-metrics", prompt),
                lambda: training_metrics(self.model, self.analyse(prompt)),
            )
        )

    # Logits --------------------------------------------------------------------------

    def top_logits(self, prompt: str, top_n: int = 10) -> schemas.TopLogits:
        top = self._cached(("logits", prompt, top_n), lambda: self._top_logits(prompt, top_n))
        return schemas.TopLogits(top=logit_rows(top, self.token_text))

    @torch.no_grad()
    def _top_logits(self, prompt: str, top_n: int) -> TopEntries:
        analysis = self.analyse(prompt)
        logits = self.transformer.model(input_ids=analysis.token_ids, use_cache=False).logits
        return largest_logits(logits[0].float(), top_n)

    def reconstruction(self, prompt: str, layer: int, top_n: int = 10) -> schemas.LogitChanges:
        self.check_layer(layer)
        comparison = self._cached(
            ("recon", prompt, layer, top_n),
            lambda: self._intervene(self.analyse(prompt), layer, top_n, reconstructed_stream),
        )
        return logit_changes(comparison, layer, self.model.layers[layer], self.token_text)

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

        def steer(analysis: PromptAnalysis) -> Float[Tensor, "layer 1 pos d_model"]:
            return steered_stream(self.model, analysis, latent, layer, factor, positions)

        comparison = self._cached(key, lambda: self._intervene(analysis, layer, top_n, steer))
        return logit_changes(comparison, layer, self.model.layers[layer], self.token_text)

    @torch.no_grad()
    def _intervene(
        self,
        analysis: PromptAnalysis,
        layer: int,
        top_n: int,
        modify: Callable[[PromptAnalysis], Float[Tensor, "layer 1 pos d_model"]],
    ) -> LogitComparison:
        """The model's own logits against those with `modify(analysis)[layer]` spliced
        in, both from one forward pass: splicing the unmodified stream gives the model's
        own."""
        stack = torch.cat([analysis.raw, modify(analysis)], dim=1)
        tokens = analysis.token_ids.expand(2, -1)
        logits = self.transformer.forward_at_layer(stack, layer, "logits", tokens).float()
        return compare_logits(logits[0], logits[1], top_n)

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
