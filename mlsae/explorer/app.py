"""The explorer's FastAPI app: the JSON API under `/api/`, the original's under `/api/py/`,
the page at `/` and its files under `/static/`.

Routes are plain functions, so FastAPI runs them in its thread pool and the event loop
stays free while the model runs; the service lets one request at a time use the model.
Before any route, `RequestGuard` checks the Host header, the body's media type and size.
Error responses never repeat the request's values: a validation error names the field
and what is wrong with it.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from mlsae.analysis.examples import Examples
from mlsae.analysis.prompt import PromptModel

from . import schemas
from .compat import compat_router
from .guards import DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS, RequestGuard
from .service import (
    DEFAULT_CACHE_BYTES,
    ExamplesReader,
    ExplorerInputError,
    ExplorerService,
    NotAvailableError,
)

STATIC_DIR = Path(__file__).parent / "static"

logger = logging.getLogger(__name__)

_ERRORS = {
    422: {"model": schemas.ErrorResponse, "description": "The input does not fit the model."},
}


def create_app(
    model: PromptModel,
    examples: Examples | ExamplesReader | str | Path | None = None,
    *,
    repo_id: str | None = None,
    cache_size: int = 8,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_prompt_tokens: int | None = None,
    cors_origins: list[str] | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    opening_prompt: str | None = None,
) -> FastAPI:
    """The explorer for `model`.

    Args:
        model: A pretrained MLSAE and its transformer, or a stack of per-layer SAEs
            (`mlsae.analysis.source.StackSource`), each layer showing its own SAE's latents.
        examples: Its top activating examples (an `Examples` or the path of its SQLite
            database); None serves none.
        repo_id: Where the model came from, shown on the page.
        cache_size: How many prompts' forward passes are kept, at most.
        cache_bytes: What the caches of forward passes and results may hold in all
            (`ExplorerService` says how it is shared).
        max_prompt_tokens: The longest prompt, in tokens (default: the model's context).
        cors_origins: Origins allowed to call the API from another site (default: none).
        allowed_hosts: The Host headers served, with any port: names, `*.example.org`
            for subdomains, or `*` for any (default: this machine's loopback names, for
            a server on 127.0.0.1). Others are answered 400, which keeps web pages from
            reaching the server through a DNS name rebound to its address.
        max_body_bytes: The largest request body; larger ones are answered 413.
        opening_prompt: The prompt the page opens on (default: the context of the top
            example, else a fixed sentence; `mlsae.explorer.opening`). One the model
            cannot take raises `ExplorerInputError`.
    """
    service = ExplorerService(
        model,
        examples,
        repo_id=repo_id,
        cache_size=cache_size,
        cache_bytes=cache_bytes,
        max_prompt_tokens=max_prompt_tokens,
        opening_prompt=opening_prompt,
    )
    app = FastAPI(
        title="MLSAE explorer",
        summary="Latent activations, logits and examples of a Multi-Layer Sparse Autoencoder.",
        version="1",
    )
    app.state.service = service
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type"],
        )
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)

    @app.exception_handler(ExplorerInputError)
    @app.exception_handler(NotAvailableError)
    def request_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": public_errors(error.errors())}, 422)

    @app.exception_handler(Exception)
    def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("error while answering %s", request.url.path, exc_info=error)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, 500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/params", tags=["explorer"])
    def params() -> schemas.Params:
        """The model: its layers, latents, k and training hyperparameters."""
        return service.params()

    @app.get("/api/opening-prompt", tags=["explorer"])
    def opening_prompt_route() -> schemas.OpeningPrompt:
        """The prompt the page opens on (unless its address names one): the server's
        `--prompt`, else the context of the model's top example, else a fixed sentence."""
        return service.opening_prompt()

    @app.post("/api/tokenize", tags=["explorer"], responses=_ERRORS)
    def tokenize(body: schemas.PromptRequest) -> schemas.Tokens:
        """The prompt's tokens."""
        return schemas.Tokens(tokens=service.tokens(body.prompt))

    @app.post("/api/metrics", tags=["explorer"], responses=_ERRORS)
    def metrics(body: schemas.PromptRequest) -> schemas.Metrics:
        """Per layer: FVU, MSE, L0, and the next-token loss and KL divergence with the
        layer's reconstruction spliced in."""
        return service.metrics(body.prompt)

    @app.post("/api/activations", tags=["explorer"], responses=_ERRORS)
    def activations(body: schemas.ActivationsRequest) -> schemas.Activations:
        """The largest latent activations at each layer and position, sparse."""
        return service.activations(body.prompt, body.top_k)

    @app.post("/api/latent", tags=["explorer"], responses=_ERRORS)
    def latent(body: schemas.LatentRequest) -> schemas.LatentTrace:
        """One latent's activation at each layer and position of the prompt."""
        return service.latent(body.prompt, body.latent)

    @app.post("/api/histograms", tags=["explorer"], responses=_ERRORS)
    def histograms(body: schemas.HistogramsRequest) -> schemas.Histograms:
        """Per layer, a histogram of the nonzero activations."""
        return service.histograms(body.prompt, body.bins)

    @app.post("/api/logits", tags=["explorer"], responses=_ERRORS)
    def logits(body: schemas.LogitsRequest) -> schemas.TopLogits:
        """The model's top next-token predictions at each position."""
        return service.top_logits(body.prompt, body.top_n)

    @app.post("/api/logits/reconstruction", tags=["explorer"], responses=_ERRORS)
    def reconstruction(body: schemas.ReconstructionRequest) -> schemas.LogitChanges:
        """The logits when the residual stream after a layer is replaced by its
        reconstruction, and how they change."""
        return service.reconstruction(body.prompt, body.layer, body.top_n)

    @app.post("/api/logits/steering", tags=["explorer"], responses=_ERRORS)
    def steering(body: schemas.SteeringRequest) -> schemas.LogitChanges:
        """The logits when the residual stream after a layer is moved along a latent's
        decoder direction, and how they change."""
        return service.steering(
            body.prompt, body.latent, body.layer, body.factor, body.positions, body.top_n
        )

    @app.post(
        "/api/examples",
        tags=["explorer"],
        responses={**_ERRORS, 404: {"model": schemas.ErrorResponse}},
    )
    def examples_route(body: schemas.ExamplesRequest) -> schemas.ExamplesResponse:
        """A latent's top activating examples at one layer, or at every layer."""
        return service.examples_by_layer(body.latent, body.layer, body.limit)

    app.include_router(compat_router())
    return app


_MAX_LOCATION_CHARS = 64
_MAX_MESSAGE_CHARS = 300


def public_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as the API answers them: type, location and message, without the
    `input` and `ctx` that repeat the request (of any size, or not even valid Unicode).
    Field names in locations, which a request chooses, are cut short."""
    return [
        {
            "type": str(error.get("type", "")),
            "loc": [_short(part, _MAX_LOCATION_CHARS) for part in error.get("loc", ())],
            "msg": _short(str(error.get("msg", "")), _MAX_MESSAGE_CHARS),
        }
        for error in errors
    ]


def _short(part: Any, limit: int) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    text = str(part).encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."
