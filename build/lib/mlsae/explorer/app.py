"""The explorer's FastAPI app: the JSON API under `/api/`, the original's under `/api/py/`,
the page at `/` and its files under `/static/`.

Routes are plain functions, so FastAPI runs them in its thread pool and the event loop
stays free while the model runs; the service lets one request at a time use the model.
"""

import logging
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from mlsae.analysis.examples import Examples
from mlsae.model.lightning import MLSAETransformer

from . import schemas
from .compat import compat_router
from .service import ExamplesReader, ExplorerInputError, ExplorerService, NotAvailableError

STATIC_DIR = Path(__file__).parent / "static"

logger = logging.getLogger(__name__)

_ERRORS = {
    422: {"model": schemas.ErrorResponse, "description": "The input does not fit the model."},
}


def create_app(
    model: MLSAETransformer,
    examples: Examples | ExamplesReader | str | Path | None = None,
    *,
    repo_id: str | None = None,
    cache_size: int = 8,
    max_prompt_tokens: int | None = None,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The explorer for `model`.

    Args:
        model: A pretrained MLSAE and its transformer.
        examples: Its top activating examples (an `Examples` or the path of its SQLite
            database); None serves none.
        repo_id: Where the model came from, shown on the page.
        cache_size: How many prompts' forward passes are kept.
        max_prompt_tokens: The longest prompt, in tokens (default: the model's context).
        cors_origins: Origins allowed to call the API from another site (default: none).
    """
    service = ExplorerService(
        model,
        examples,
        repo_id=repo_id,
        cache_size=cache_size,
        max_prompt_tokens=max_prompt_tokens,
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

    @app.exception_handler(ExplorerInputError)
    @app.exception_handler(NotAvailableError)
    def request_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which fails to serialise if it is NaN.
        return JSONResponse({"detail": _json_safe(jsonable_encoder(error.errors()))}, 422)

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


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
