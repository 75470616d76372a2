"""The explorer's service: the analyses of one pretrained MLSAE (or stack of per-layer
SAEs), cached, one request at a time, converted to the API's schemas.

`ExplorerService` asks `mlsae.analysis.prompt` for a prompt's analysis (the transformer
and the autoencoder run once) and keeps it in an LRU cache bounded by count and by bytes,
so the many requests a page makes for one prompt run the model once. What a route derives
from it (metrics; logits and interventions, one more forward pass each) is cached by its
arguments in a second such cache, compactly: the top entries per position, not the dense
logits. The conventions (layers, activations, steering, KL divergences) are those of
`mlsae.analysis.prompt` and `mlsae.analysis.interventions`.
"""

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TypeVar

from jaxtyping import Float
from torch import Tensor

from mlsae.analysis import interventions, prompt
from mlsae.analysis.examples import Examples
from mlsae.analysis.prompt import PromptAnalysis, PromptError, PromptModel
from mlsae.analysis.source import StackSource
from mlsae.analysis.stack_prompt import check_explorable

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
from .model_info import latents_per_position, model_params
from .opening import choose_opening_prompt

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


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """What the analysis refuses, as the explorer answers it."""
    try:
        yield
    except PromptError as error:
        raise ExplorerInputError(str(error)) from error


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class ExplorerService:
    """Prompt analyses of one `MLSAETransformer` or `StackSource`, cached. Thread-safe: one
    request at a time uses the model."""

    def __init__(
        self,
        model: PromptModel,
        examples: "Examples | ExamplesReader | str | Path | None" = None,
        *,
        repo_id: str | None = None,
        cache_size: int = 8,
        results_cache_size: int = 256,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_prompt_tokens: int | None = None,
        opening_prompt: str | None = None,
    ) -> None:
        """
        Args:
            model: The pretrained MLSAE and its transformer, or a stack of per-layer SAEs
                and its transformer (put in eval mode here).
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
                transformer's context length, `mlsae.analysis.prompt.longest_prompt`).
            opening_prompt: The prompt the page opens on (default: `mlsae.explorer.opening`
                chooses one); one the model cannot take raises `ExplorerInputError`.
        """
        if isinstance(model, StackSource):
            check_explorable(model)  # no transcoders, one width
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.transformer = model.transformer
        self.tokenizer = model.transformer.tokenizer
        self.examples = open_examples(examples)
        self.repo_id = repo_id
        self.n_layers = model.n_layers
        self.n_latents = model.n_latents
        self.k = latents_per_position(model)
        longest = prompt.longest_prompt(model)
        self.max_prompt_tokens = min(max_prompt_tokens or longest, longest)
        results_bytes = cache_bytes // 4
        self.analyses = LRUCache(cache_size, max_bytes=cache_bytes - results_bytes)
        self.results = LRUCache(results_cache_size, max_bytes=results_bytes)
        self._lock = threading.RLock()
        self._token_texts: dict[int, str] = {}
        if opening_prompt is not None:
            self.token_ids(opening_prompt)
        self._given_opening = opening_prompt
        self._opening: schemas.OpeningPrompt | None = None

    # Validation and tokens -----------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        with _input_errors():
            return prompt.check_layer(self.model, layer)

    def check_latent(self, latent: int) -> int:
        with _input_errors():
            return prompt.check_latent(self.model, latent)

    def token_ids(self, text: str) -> list[int]:
        """The prompt's token ids, checked against the longest prompt served."""
        with self._lock, _input_errors():
            return prompt.prompt_token_ids(self.model, text, self.max_prompt_tokens)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            with self._lock:  # a fast tokenizer must not be used by two threads at once
                text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def tokens(self, text: str) -> list[schemas.Token]:
        with self._lock:
            special = set(self.transformer.special_token_ids)
            return [
                schemas.Token(
                    pos=pos,
                    id=token_id,
                    token=self.token_text(token_id),
                    special=token_id in special,
                )
                for pos, token_id in enumerate(self.token_ids(text))
            ]

    def params(self) -> schemas.Params:
        return schemas.Params(
            repo_id=self.repo_id,
            n_layers=self.n_layers,
            n_latents=self.n_latents,
            k=self.k,
            vocab_size=int(self.transformer.model.get_output_embeddings().weight.shape[0]),
            max_prompt_tokens=self.max_prompt_tokens,
            examples_available=self.examples is not None,
            **model_params(self.model),
        )

    def opening_prompt(self) -> schemas.OpeningPrompt:
        """The prompt the page opens on, chosen once."""
        with self._lock:
            if self._opening is None:
                self._opening = choose_opening_prompt(
                    self._given_opening,
                    self.examples,
                    self.tokenizer,
                    self.max_prompt_tokens,
                    self.token_ids,
                )
            return self._opening

    # The cached analysis -------------------------------------------------------------

    def analyse(self, text: str) -> PromptAnalysis:
        """The prompt's analysis, from the cache when it is there."""
        with self._lock, _input_errors():
            return self._get_or_compute(
                self.analyses,
                text,
                lambda: prompt.analyse_prompt(self.model, text, self.max_prompt_tokens),
            )

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

    def activations(self, text: str, top_k: int | None = None) -> schemas.Activations:
        top_k = self.k if top_k is None else top_k
        if not 1 <= top_k <= self.k:
            raise ExplorerInputError(f"top_k must be in [1, {self.k}] (the model's k)")
        values, latents = prompt.sorted_activations(self.analyse(text))
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
        return schemas.Activations(tokens=self.tokens(text), max=values[..., 0].tolist(), top=top)

    def dense_activations(self, text: str) -> Float[Tensor, "layer pos n_latents"]:
        return prompt.dense_activations(self.analyse(text), self.n_latents)

    def latent(self, text: str, latent: int) -> schemas.LatentTrace:
        self.check_latent(latent)
        acts = prompt.latent_activations(self.analyse(text), latent)
        return schemas.LatentTrace(
            latent=latent,
            acts=acts.tolist(),
            max=float(acts.max()),
            layer_mean=_finite_or_none(float(prompt.mean_layer(acts))),
        )

    def histograms(self, text: str, bins: int = 32) -> schemas.Histograms:
        histograms = prompt.activation_histograms(self.analyse(text), bins)
        return schemas.Histograms(
            edges=histograms.edges.tolist(),
            counts=histograms.counts.tolist(),
            zeros=histograms.zeros.tolist(),
        )

    def dense_histograms(self, text: str, bins: int) -> prompt.Histograms:
        """Histograms of every latent's activation, zeros included (the original's)."""
        return prompt.dense_histograms(self.analyse(text), self.n_latents, bins)

    # Metrics -------------------------------------------------------------------------

    def metrics(self, text: str) -> schemas.Metrics:
        """Per layer: FVU, MSE, L0, and the spliced next-token loss and KL divergence."""
        metrics = self._cached(
            ("metrics", text), lambda: prompt.prompt_metrics(self.model, self.analyse(text))
        )
        columns = {
            name: getattr(metrics, name).tolist()
            for name in ("fvu", "mse", "l0", "loss", "loss_delta", "kl_div")
        }
        layers = [
            schemas.LayerMetrics(
                layer=layer,
                block=block,
                **{name: _finite_or_none(values[layer]) for name, values in columns.items()},
            )
            for layer, block in enumerate(self.model.layers)
        ]
        loss = _finite_or_none(metrics.own_loss)
        return schemas.Metrics(n_tokens=metrics.n_counted, loss=loss, layers=layers)

    def training_metrics(self, text: str) -> dict[str, float | None]:
        """The model's training metrics (`train/fvu/layer_0`, ...) on the prompt."""
        values = self._cached(
            ("training-metrics", text),
            lambda: prompt.training_metrics(self.model, self.analyse(text)),
        )
        return {name: _finite_or_none(value) for name, value in values.items()}

    # Logits --------------------------------------------------------------------------

    def top_logits(self, text: str, top_n: int = 10) -> schemas.TopLogits:
        def compute() -> TopEntries:
            return largest_logits(interventions.model_logits(self.model, self.analyse(text)), top_n)

        top = self._cached(("logits", text, top_n), compute)
        return schemas.TopLogits(top=logit_rows(top, self.token_text))

    def reconstruction(self, text: str, layer: int, top_n: int = 10) -> schemas.LogitChanges:
        self.check_layer(layer)
        comparison = self._cached(
            ("recon", text, layer, top_n),
            lambda: self._intervene(text, layer, top_n, interventions.reconstructed_stream),
        )
        return logit_changes(comparison, layer, self.model.layers[layer], self.token_text)

    def steering(
        self,
        text: str,
        latent: int,
        layer: int,
        factor: float,
        positions: list[int] | None = None,
        top_n: int = 10,
    ) -> schemas.LogitChanges:
        self.check_layer(layer)
        self.check_latent(latent)

        def steered(analysis: PromptAnalysis) -> Float[Tensor, "layer 1 pos d_model"]:
            return interventions.steered_stream(self.model, analysis, latent, layer, factor, chosen)

        with _input_errors():  # positions outside the prompt, a factor that is not finite
            chosen = interventions.steering_positions(self.analyse(text), positions)
            comparison = self._cached(
                ("steer", text, latent, layer, factor, chosen, top_n),
                lambda: self._intervene(text, layer, top_n, steered),
            )
        return logit_changes(comparison, layer, self.model.layers[layer], self.token_text)

    def _intervene(
        self,
        text: str,
        layer: int,
        top_n: int,
        modify: Callable[[PromptAnalysis], Float[Tensor, "layer 1 pos d_model"]],
    ) -> LogitComparison:
        """The model's own logits against those with `modify(analysis)[layer]` spliced in."""
        analysis = self.analyse(text)
        logits = interventions.spliced_logits(self.model, analysis, layer, modify(analysis))
        return compare_logits(logits, top_n)

    # Examples ------------------------------------------------------------------------

    def latent_examples(
        self, layer: int, latent: int, limit: int | None = None
    ) -> list[schemas.Example]:
        """The latent's top examples at a layer, tokens decoded one by one."""
        self.check_layer(layer)
        self.check_latent(latent)
        if self.examples is None:
            raise NotAvailableError(
                "this server has no examples database: start it with --examples, or run "
                "`python -m mlsae.analysis.examples --repo_id ...` first"
            )
        return [
            schemas.Example(
                **row._replace(
                    token=self.token_text(row.token_id),
                    tokens=[self.token_text(token_id) for token_id in row.token_ids],
                )._asdict()
            )
            for row in self.examples.get(layer, latent)[:limit]
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
