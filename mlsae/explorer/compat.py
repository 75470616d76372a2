"""The original implementation's API under `/api/py/`, with its request and response shapes,
so that its Next.js front end works against this server.

Differences, all in values rather than shapes: layer 0 is layer 0 (the original spliced
at the last layer when asked for layer 0); positions the model does not encode (special
tokens) show no activations; steering scales the decoder direction as
`mlsae.analysis.interventions` describes; token strings are decoded one token at a time;
a server without examples answers `/api/py/examples` with an empty list.
"""

import json

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from .model_info import hparams
from .schemas import Example, Latent, Layer, Logit, Prompt
from .service import ExplorerService

NUM_LOGITS = 16
"""Logits per position, as the original's default."""

HISTOGRAM_BINS = 64
"""Histogram bins, as the original's default."""


class CompatBody(BaseModel):
    """A request body of the original API: unknown fields are ignored, as there, but
    values are not coerced."""

    model_config = ConfigDict(strict=True)


class PromptRequest(CompatBody):
    prompt: Prompt


class ExamplesRequest(CompatBody):
    layer: Layer
    latent: Latent


class PromptLogitsReconRequest(CompatBody):
    prompt: Prompt
    layer: Layer


class PromptLogitsSteerRequest(CompatBody):
    prompt: Prompt
    latent: Latent
    layer: Layer
    factor: float = Field(ge=-1e4, le=1e4, allow_inf_nan=False)


class Token(BaseModel):
    id: int
    token: str
    pos: int


class MaxLogits(BaseModel):
    max: list[list[Logit]]


class LogitChanges(BaseModel):
    max: list[list[Logit]]
    min: list[list[Logit]]


class LatentActivations(BaseModel):
    values: list[list[list[float]]]
    """Dense: layer x position x latent."""
    max: list[list[float]]


class LayerHistograms(BaseModel):
    values: list[list[int]]
    edges: list[float]


def _json(content: object) -> Response:
    """Large dense bodies, serialised without a pydantic pass over every number."""
    return Response(json.dumps(content, separators=(",", ":")), media_type="application/json")


def _service(request: Request) -> ExplorerService:
    return request.app.state.service


def compat_router() -> APIRouter:
    router = APIRouter(prefix="/api/py", tags=["original API"])

    @router.get("/params")
    def params(request: Request) -> dict:
        return hparams(_service(request).model)

    @router.post("/examples")
    def examples(body: ExamplesRequest, request: Request) -> list[Example]:
        service = _service(request)
        service.check_layer(body.layer)
        service.check_latent(body.latent)
        if service.examples is None:
            return []
        return service.latent_examples(body.layer, body.latent)

    @router.post("/prompt/tokens")
    def prompt_tokens(body: PromptRequest, request: Request) -> list[Token]:
        return [
            Token(id=token.id, token=token.token, pos=token.pos)
            for token in _service(request).tokens(body.prompt)
        ]

    @router.post("/prompt/metrics")
    def prompt_metrics(body: PromptRequest, request: Request) -> dict[str, float | None]:
        return _service(request).training_metrics(body.prompt)

    @router.post("/prompt/latent-activations", response_model=LatentActivations)
    def prompt_latent_activations(body: PromptRequest, request: Request) -> Response:
        dense = _service(request).dense_activations(body.prompt)
        return _json({"values": dense.tolist(), "max": dense.max(-1).values.tolist()})

    @router.post("/prompt/layer-histograms", response_model=LayerHistograms)
    def prompt_layer_histograms(body: PromptRequest, request: Request) -> Response:
        histograms = _service(request).dense_histograms(body.prompt, HISTOGRAM_BINS)
        edges = [round(edge, 3) for edge in histograms.edges.tolist()]
        return _json({"values": histograms.counts.tolist(), "edges": edges})

    @router.post("/prompt/logits-input")
    def prompt_logits_input(body: PromptRequest, request: Request) -> MaxLogits:
        top = _service(request).top_logits(body.prompt, NUM_LOGITS).top
        return MaxLogits(max=[[Logit(**logit.model_dump()) for logit in row] for row in top])

    @router.post("/prompt/logits-recon")
    def prompt_logits_recon(
        body: PromptLogitsReconRequest, request: Request
    ) -> tuple[MaxLogits, LogitChanges]:
        changes = _service(request).reconstruction(body.prompt, body.layer, NUM_LOGITS)
        return _max_logits_and_changes(changes)

    @router.post("/prompt/logits-steer")
    def prompt_logits_steer(
        body: PromptLogitsSteerRequest, request: Request
    ) -> tuple[MaxLogits, LogitChanges]:
        changes = _service(request).steering(
            body.prompt, body.latent, body.layer, body.factor, top_n=NUM_LOGITS
        )
        return _max_logits_and_changes(changes)

    @router.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> dict:
        return request.app.openapi()

    return router


def _max_logits_and_changes(changes) -> tuple[MaxLogits, LogitChanges]:
    def convert(rows):
        return [[Logit(**logit.model_dump()) for logit in row] for row in rows]

    return (
        MaxLogits(max=convert(changes.top)),
        LogitChanges(max=convert(changes.increased), min=convert(changes.decreased)),
    )
