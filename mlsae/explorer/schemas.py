"""Request and response bodies of the explorer's JSON API (`/api/...`).

Layers are positions in the MLSAE's stack (0 .. n_layers - 1); `blocks` in the parameters
maps them to the transformer's decoder blocks. Bounds that depend on the model (layer,
latent, prompt length) are checked by the service, which answers 422 like pydantic does.
"""

from typing import Annotated, Any, Literal, NamedTuple, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from mlsae.analysis.examples_db import Example as StoredExample

MAX_TOP_N = 100
"""The most logits or latents a request may ask for per position."""

Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100_000,
        description="The text to analyse; it must not be empty.",
        examples=["When Mary and John went to the store, John gave a drink to"],
    ),
]
Layer = Annotated[int, Field(ge=0, description="A layer of the stack, 0 .. n_layers - 1.")]
Latent = Annotated[int, Field(ge=0, description="A latent, 0 .. n_latents - 1.")]
TopN = Annotated[int, Field(ge=1, le=MAX_TOP_N, description="Entries per position.")]


class StrictBody(BaseModel):
    """A request body: no unknown fields, and no coercion (`true` or `"3"` is not an
    integer; an integer is still a float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PromptRequest(StrictBody):
    prompt: Prompt


class ActivationsRequest(StrictBody):
    prompt: Prompt
    top_k: Annotated[int | None, Field(ge=1, description="Latents per layer and position.")] = None
    """At most the model's k (the latents a TopK SAE selects); None: k."""


class LatentRequest(StrictBody):
    prompt: Prompt
    latent: Latent


class HistogramsRequest(StrictBody):
    prompt: Prompt
    bins: Annotated[int, Field(ge=1, le=1024)] = 32


class LogitsRequest(StrictBody):
    prompt: Prompt
    top_n: TopN = 10


class ReconstructionRequest(StrictBody):
    prompt: Prompt
    layer: Layer
    top_n: TopN = 10


class SteeringRequest(StrictBody):
    prompt: Prompt
    latent: Latent
    layer: Layer
    factor: Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)] = 10.0
    """How much the latent's activation is raised (negative: lowered) at each steered
    position, in the units of the autoencoder's standardised space."""

    positions: Annotated[list[Annotated[int, Field(ge=0)]] | None, Field(max_length=100_000)] = None
    """The token positions to steer; None: all of them."""

    top_n: TopN = 10


class ExamplesRequest(StrictBody):
    latent: Latent
    layer: Layer | None = None
    """None: every layer."""

    limit: Annotated[int, Field(ge=1, le=1000)] = 32
    """The most examples per layer."""


class Params(BaseModel):
    repo_id: str | None
    model_name: str
    n_layers: int
    blocks: list[int]
    """The transformer block of each layer of the stack."""
    n_latents: int
    d_model: int
    k: int
    vocab_size: int
    max_prompt_tokens: int
    standardize: bool
    tuned_lens: bool
    examples_available: bool
    hparams: dict


class OpeningPrompt(BaseModel):
    """The prompt the page opens on."""

    prompt: str
    source: Literal["option", "example", "fallback"]
    """Where it comes from: the server's `--prompt`; the context of the model's top
    example in the examples database; or, without either, a fixed sentence."""
    latent: int | None = None
    """For an example: the latent it is the top example of."""
    layer: int | None = None
    """For an example: the layer it is the top example at."""


class Token(BaseModel):
    pos: int
    id: int
    token: str
    special: bool
    """Whether this is a BOS/EOS/PAD position, which the autoencoder does not encode."""


class Tokens(BaseModel):
    tokens: list[Token]


class LayerMetrics(BaseModel):
    """One layer's metrics; each is None where it is not defined (no loss for a one-token
    prompt, no L0 without positions that count)."""

    layer: int
    block: int
    fvu: float | None
    """Fraction of variance unexplained by the reconstruction."""
    mse: float | None
    l0: float | None
    """Mean number of latents above the dead threshold per position."""
    loss: float | None
    """Next-token cross-entropy (nats) with this layer's reconstruction spliced in."""
    loss_delta: float | None
    """`loss` minus the model's own loss."""
    kl_div: float | None
    """KL divergence of the spliced logits from the model's own, per position."""


class Metrics(BaseModel):
    n_tokens: int
    """The positions that count (special tokens excluded)."""
    loss: float | None
    """The model's own next-token loss; None for a one-token prompt."""
    layers: list[LayerMetrics]


class LatentActivation(BaseModel):
    latent: int
    act: float


class Activations(BaseModel):
    tokens: list[Token]
    max: list[list[float]]
    """The largest activation at each layer and position (0 at special positions)."""
    top: list[list[list[LatentActivation]]]
    """Per layer and position, the `top_k` largest activations (ReLU, so > 0 only),
    in descending order."""


class LatentTrace(BaseModel):
    latent: int
    acts: list[list[float]]
    """The latent's activation at each layer and position."""
    max: float
    layer_mean: float | None
    """The mean layer, weighted by the activation summed over positions; None if it
    never fires on the prompt."""


class Histograms(BaseModel):
    edges: list[float]
    """`bins + 1` edges from 0 to the largest activation, shared by every layer."""
    counts: list[list[int]]
    """Per layer, how many selected activations above 0 fall in each bin."""
    zeros: list[int]
    """Per layer, how many of the positions' k selections are 0 after ReLU."""


class Logit(BaseModel):
    id: int
    token: str
    logit: float
    prob: float | None = None


class TopLogits(BaseModel):
    top: list[list[Logit]]
    """Per position, the largest logits with their softmax probabilities."""


class LogitChanges(BaseModel):
    layer: int
    block: int
    top: list[list[Logit]]
    """Per position, the largest logits after the intervention."""
    increased: list[list[Logit]]
    """Per position, the largest rises in logit (`logit` is the change)."""
    decreased: list[list[Logit]]
    """Per position, the largest falls in logit (`logit` is the change)."""
    kl_div: list[float]
    """Per position, KL(intervened || model's own) of the next-token distributions."""


def fields_of(record: type[NamedTuple]) -> dict[str, Any]:
    """The fields of a NamedTuple, with their types, as `pydantic.create_model` takes them
    (each required)."""
    return {name: (hint, ...) for name, hint in get_type_hints(record).items()}


class Example(create_model("ExampleFields", **fields_of(StoredExample))):
    """A top activating example, with the fields of `mlsae.analysis.examples_db.Example`
    (declared there, once; this model is built from them, so the two cannot drift apart).

    The explorer fills `token` and `tokens` with the text of each token, decoded one by
    one, where the database keeps the tokenizer's token names (such as `Ġcat`)."""


class LayerExamples(BaseModel):
    layer: int
    examples: list[Example]


class ExamplesResponse(BaseModel):
    latent: int
    available: bool
    """False when the server has no examples database."""
    layers: list[LayerExamples]


class ErrorResponse(BaseModel):
    detail: str | list
