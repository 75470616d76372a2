"""The explorer's HTTP API on a tiny model, through FastAPI's test client."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from mlsae.analysis.examples import Examples
from mlsae.explorer import create_app
from mlsae.explorer.__main__ import find_examples, parse_args
from mlsae.explorer.service import LRUCache
from mlsae.model.autoencoder import standardize
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.losses import layerwise_fvu
from tests.explorer.conftest import PROMPT, PROMPT_ROUTES, local_client, tiny_model

N_LAYERS, N_LATENTS, K = 4, 96, 4


@pytest.fixture
def client(model: MLSAETransformer, examples_db: Path) -> TestClient:
    return local_client(create_app(model, examples_db, repo_id="tiny"))


@pytest.fixture
def bare_client(model: MLSAETransformer) -> TestClient:
    """Answers a server error with a 500 response instead of raising it."""
    return local_client(create_app(model), raise_server_exceptions=False)


def post(client: TestClient, path: str, **body) -> dict | list:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(model: MLSAETransformer, prompt: str = PROMPT) -> torch.Tensor:
    return torch.tensor([model.transformer.tokenizer(prompt)["input_ids"]])


def dense_activations(model: MLSAETransformer, prompt: str = PROMPT) -> torch.Tensor:
    """`[layer, pos, latent]` activations after ReLU, straight from the model."""
    output = model(token_ids(model, prompt))
    dense = torch.zeros(N_LAYERS, output.topk.values.shape[2], N_LATENTS)
    return dense.scatter_(-1, output.topk.indices[:, 0], output.topk.values[:, 0])


# Parameters, tokens, the page ------------------------------------------------------------


def test_params(client: TestClient) -> None:
    params = client.get("/api/params").json()
    assert params["n_layers"] == N_LAYERS
    assert params["blocks"] == [0, 1, 2, 3]
    assert params["n_latents"] == N_LATENTS
    assert params["k"] == K
    assert params["max_prompt_tokens"] == 128  # the tiny model's max_position_embeddings
    assert params["examples_available"] is True
    assert params["repo_id"] == "tiny"
    assert params["hparams"]["expansion_factor"] == 2


def test_tokenize(client: TestClient, model: MLSAETransformer) -> None:
    tokens = post(client, "/api/tokenize", prompt=PROMPT)["tokens"]
    ids = token_ids(model)[0].tolist()
    assert [token["id"] for token in tokens] == ids
    assert [token["pos"] for token in tokens] == list(range(len(ids)))
    assert "".join(token["token"] for token in tokens) == PROMPT
    assert not any(token["special"] for token in tokens)
    special = post(client, "/api/tokenize", prompt="<|endoftext|>hi")["tokens"]
    assert special[0]["special"] is True


def test_page_static_files_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="heatmap"' in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/params",
        "/api/opening-prompt",
        "/api/tokenize",
        "/api/metrics",
        "/api/activations",
        "/api/latent",
        "/api/histograms",
        "/api/logits",
        "/api/logits/reconstruction",
        "/api/logits/steering",
        "/api/examples",
        "/api/py/prompt/logits-steer",
    ):
        assert path in paths
    assert client.get("/api/py/openapi.json").json()["paths"] == paths


# Latents -----------------------------------------------------------------------------------


def test_activations_are_sparse_and_match_the_model(
    client: TestClient, model: MLSAETransformer
) -> None:
    dense = dense_activations(model)
    body = post(client, "/api/activations", prompt=PROMPT)
    n_positions = dense.shape[1]
    assert len(body["tokens"]) == n_positions
    assert torch.allclose(torch.tensor(body["max"]), dense.max(-1).values, atol=1e-5)
    assert len(body["top"]) == N_LAYERS
    for layer, rows in enumerate(body["top"]):
        assert len(rows) == n_positions
        for pos, entries in enumerate(rows):
            acts = [entry["act"] for entry in entries]
            assert len(entries) <= K and acts == sorted(acts, reverse=True)
            assert all(act > 0 for act in acts)
            for entry in entries:
                assert dense[layer, pos, entry["latent"]] == pytest.approx(entry["act"], abs=1e-5)
            assert len(entries) == int((dense[layer, pos] > 0).sum())

    top_one = post(client, "/api/activations", prompt=PROMPT, top_k=1)["top"]
    assert all(len(entries) <= 1 for rows in top_one for entries in rows)


def test_latent_trace(client: TestClient, model: MLSAETransformer) -> None:
    dense = dense_activations(model)
    latent = int(dense.amax(dim=(0, 1)).argmax())
    trace = post(client, "/api/latent", prompt=PROMPT, latent=latent)
    acts = torch.tensor(trace["acts"])
    assert torch.allclose(acts, dense[..., latent], atol=1e-5)
    assert trace["max"] == pytest.approx(float(acts.max()), abs=1e-5)
    weights = acts.sum(-1)
    expected_mean = float((weights * torch.arange(N_LAYERS)).sum() / weights.sum())
    assert trace["layer_mean"] == pytest.approx(expected_mean, abs=1e-5)


def test_histograms_count_every_selection(client: TestClient, model: MLSAETransformer) -> None:
    body = post(client, "/api/histograms", prompt=PROMPT, bins=8)
    n_positions = token_ids(model).shape[1]
    assert len(body["edges"]) == 9 and body["edges"][0] == 0
    dense = dense_activations(model)
    assert body["edges"][-1] == pytest.approx(float(dense.max()), abs=1e-5)
    for layer, (counts, zeros) in enumerate(zip(body["counts"], body["zeros"], strict=True)):
        assert len(counts) == 8
        assert sum(counts) == int((dense[layer] > 0).sum())
        assert sum(counts) + zeros == n_positions * K


def test_metrics(client: TestClient, model: MLSAETransformer) -> None:
    body = post(client, "/api/metrics", prompt=PROMPT)
    tokens = token_ids(model)
    stream = model.residual_stream(tokens)
    output = model.autoencoder(stream.inputs)
    fvu = layerwise_fvu(stream.inputs, output.recons)
    logits = model.transformer.model(input_ids=tokens).logits
    own_loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert body["n_tokens"] == tokens.shape[1]
    assert body["loss"] == pytest.approx(float(own_loss), abs=1e-4)
    assert [row["layer"] for row in body["layers"]] == list(range(N_LAYERS))
    for row in body["layers"]:
        assert row["fvu"] == pytest.approx(float(fvu[row["layer"]]), rel=1e-4)
        assert row["l0"] == pytest.approx(K)
        assert row["loss_delta"] == pytest.approx(row["loss"] - body["loss"], abs=1e-5)
        assert row["kl_div"] >= 0


def test_metrics_of_a_one_token_prompt(client: TestClient, model: MLSAETransformer) -> None:
    assert token_ids(model, "a").shape[1] == 1
    body = post(client, "/api/metrics", prompt="a")
    assert body["n_tokens"] == 1 and body["loss"] is None  # no next token to predict
    for row in body["layers"]:
        assert row["loss"] is None and row["loss_delta"] is None
        assert row["fvu"] > 0 and row["l0"] == pytest.approx(K)


# Logits ------------------------------------------------------------------------------------


def test_top_logits(client: TestClient, model: MLSAETransformer) -> None:
    top = post(client, "/api/logits", prompt=PROMPT, top_n=5)["top"]
    logits = model.transformer.model(input_ids=token_ids(model)).logits[0]
    probs = logits.softmax(-1)
    assert len(top) == logits.shape[0]
    for pos, row in enumerate(top):
        assert [entry["id"] for entry in row] == logits[pos].topk(5).indices.tolist()
        for entry in row:
            assert entry["logit"] == pytest.approx(float(logits[pos, entry["id"]]), abs=1e-4)
            assert entry["prob"] == pytest.approx(float(probs[pos, entry["id"]]), abs=1e-5)


def spliced_logits(model: MLSAETransformer, stack: torch.Tensor, layer: int) -> torch.Tensor:
    return model.transformer.forward_at_layer(stack, layer, "logits", token_ids(model))[0]


@pytest.mark.parametrize("layer", [0, N_LAYERS - 1])
def test_reconstruction_splices_at_the_layer_asked_for(
    client: TestClient, model: MLSAETransformer, layer: int
) -> None:
    body = post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=layer, top_n=3)
    assert body["layer"] == layer and body["block"] == layer
    tokens = token_ids(model)
    recons = model(tokens).recons
    own = model.transformer.model(input_ids=tokens).logits[0]
    after = spliced_logits(model, recons, layer)
    change = after - own
    for pos in range(tokens.shape[1]):
        assert [entry["id"] for entry in body["top"][pos]] == after[pos].topk(3).indices.tolist()
        increased = [entry["logit"] for entry in body["increased"][pos]]
        decreased = [entry["logit"] for entry in body["decreased"][pos]]
        assert increased == pytest.approx(change[pos].topk(3).values.tolist(), abs=1e-4)
        assert decreased == pytest.approx((-change[pos]).topk(3).values.neg().tolist(), abs=1e-4)
        assert all(entry["prob"] is None for entry in body["increased"][pos])
        assert body["kl_div"][pos] >= 0


def test_steering_adds_the_scaled_decoder_direction(
    client: TestClient, model: MLSAETransformer
) -> None:
    latent, layer, factor = 7, 1, 3.0
    body = post(
        client,
        "/api/logits/steering",
        prompt=PROMPT,
        latent=latent,
        layer=layer,
        factor=factor,
        top_n=3,
    )
    tokens = token_ids(model)
    stream = model.residual_stream(tokens)
    std = standardize(stream.inputs)[1].std
    steered = stream.raw.clone()
    steered[layer] += factor * std[layer] * model.autoencoder.decoder.weight[:, latent]
    after = spliced_logits(model, steered, layer)
    for pos in range(tokens.shape[1]):
        assert [entry["id"] for entry in body["top"][pos]] == after[pos].topk(3).indices.tolist()
        assert body["top"][pos][0]["logit"] == pytest.approx(float(after[pos].max()), abs=1e-4)


def test_steering_leaves_unsteered_earlier_positions_alone(client: TestClient) -> None:
    last = len(post(client, "/api/tokenize", prompt=PROMPT)["tokens"]) - 1
    body = post(
        client,
        "/api/logits/steering",
        prompt=PROMPT,
        latent=3,
        layer=0,
        factor=50.0,
        positions=[last],
    )
    assert all(kl == pytest.approx(0, abs=1e-6) for kl in body["kl_div"][:last])
    assert body["kl_div"][last] > 1e-4


def test_steering_no_positions_is_not_steering_all(client: TestClient) -> None:
    body = dict(prompt=PROMPT, latent=3, layer=0, factor=50.0)
    nowhere = post(client, "/api/logits/steering", **body, positions=[])
    everywhere = post(client, "/api/logits/steering", **body)
    assert all(kl == pytest.approx(0, abs=1e-6) for kl in nowhere["kl_div"])
    assert all(kl > 1e-4 for kl in everywhere["kl_div"])


def test_zero_steering_changes_nothing(client: TestClient) -> None:
    body = post(
        client, "/api/logits/steering", prompt=PROMPT, latent=3, layer=2, factor=0.0, top_n=2
    )
    for pos_changes in body["increased"] + body["decreased"]:
        assert all(abs(entry["logit"]) < 1e-4 for entry in pos_changes)


# Examples ----------------------------------------------------------------------------------


def test_examples_at_every_layer(client: TestClient, examples_db: Path) -> None:
    stored = Examples(examples_db)
    latent = next(stored.rows())["latent"]
    body = post(client, "/api/examples", latent=latent)
    assert body["available"] is True and body["latent"] == latent
    assert [entry["layer"] for entry in body["layers"]] == list(range(N_LAYERS))
    for entry in body["layers"]:
        rows = stored.get(entry["layer"], latent)
        assert [example["act"] for example in entry["examples"]] == [row.act for row in rows]
        for example in entry["examples"]:
            assert len(example["tokens"]) == len(example["token_ids"]) == len(example["acts"])
    one_layer = post(client, "/api/examples", latent=latent, layer=2, limit=1)
    assert [entry["layer"] for entry in one_layer["layers"]] == [2]
    assert len(one_layer["layers"][0]["examples"]) <= 1


def test_examples_without_a_database(bare_client: TestClient) -> None:
    body = post(bare_client, "/api/examples", latent=0)
    assert body == {"latent": 0, "available": False, "layers": []}
    assert post(bare_client, "/api/py/examples", latent=0, layer=0) == []
    assert bare_client.get("/api/params").json()["examples_available"] is False


# Bad input -----------------------------------------------------------------------------------

TOO_LONG = "word " * 200  # about 400 tokens; the tiny model's context is 128

BAD_REQUESTS = [
    ("/api/tokenize", {"prompt": ""}),
    ("/api/tokenize", {}),
    ("/api/tokenize", {"prompt": 3}),
    ("/api/tokenize", {"prompt": TOO_LONG}),
    ("/api/tokenize", {"prompt": "hi", "unexpected": 1}),
    ("/api/metrics", {"prompt": ""}),
    ("/api/activations", {"prompt": PROMPT, "top_k": K + 1}),
    ("/api/activations", {"prompt": PROMPT, "top_k": 0}),
    ("/api/activations", {"prompt": TOO_LONG}),
    ("/api/latent", {"prompt": PROMPT, "latent": N_LATENTS}),
    ("/api/latent", {"prompt": PROMPT, "latent": -1}),
    ("/api/histograms", {"prompt": PROMPT, "bins": 0}),
    ("/api/logits", {"prompt": PROMPT, "top_n": 0}),
    ("/api/logits/reconstruction", {"prompt": PROMPT, "layer": N_LAYERS}),
    ("/api/logits/reconstruction", {"prompt": PROMPT, "layer": -1}),
    ("/api/logits/reconstruction", {"prompt": PROMPT, "layer": "first"}),
    ("/api/logits/steering", {"prompt": PROMPT, "latent": N_LATENTS, "layer": 0}),
    ("/api/logits/steering", {"prompt": PROMPT, "latent": 0, "layer": N_LAYERS}),
    ("/api/logits/steering", '{"prompt": "hi", "latent": 0, "layer": 0, "factor": Infinity}'),
    ("/api/logits/steering", '{"prompt": "hi", "latent": 0, "layer": 0, "factor": NaN}'),
    ("/api/py/prompt/logits-steer", '{"prompt": "hi", "latent": 0, "layer": 0, "factor": NaN}'),
    ("/api/logits/steering", {"prompt": PROMPT, "latent": 0, "layer": 0, "positions": [999]}),
    ("/api/examples", {"latent": N_LATENTS}),
    ("/api/examples", {"latent": 0, "layer": N_LAYERS}),
    ("/api/py/examples", {"latent": 0, "layer": N_LAYERS}),
    ("/api/py/prompt/tokens", {"prompt": ""}),
    ("/api/py/prompt/metrics", {"prompt": TOO_LONG}),
    ("/api/py/prompt/latent-activations", {"prompt": ""}),
    ("/api/py/prompt/layer-histograms", {}),
    ("/api/py/prompt/logits-input", {"prompt": TOO_LONG}),
    ("/api/py/prompt/logits-recon", {"prompt": PROMPT, "layer": N_LAYERS}),
    (
        "/api/py/prompt/logits-steer",
        {"prompt": PROMPT, "latent": N_LATENTS, "layer": 0, "factor": 1},
    ),
    ("/api/py/prompt/logits-steer", {"prompt": PROMPT, "latent": 0, "layer": -1, "factor": 1}),
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS)
def test_bad_input_is_a_json_4xx(bare_client: TestClient, path: str, body: dict | str) -> None:
    if isinstance(body, str):  # JSON that the client would refuse to write (NaN, Infinity)
        response = bare_client.post(
            path, content=body.encode(), headers={"Content-Type": "application/json"}
        )
    else:
        response = bare_client.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]


def test_malformed_json_is_a_json_4xx(bare_client: TestClient) -> None:
    response = bare_client.post(
        "/api/activations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"]


def context_filling_prompt(model: MLSAETransformer) -> str:
    """A prompt of exactly the tiny model's 128 tokens."""
    tokenizer = model.transformer.tokenizer
    prompt = tokenizer.decode(tokenizer("ab " * 200)["input_ids"][:128])
    assert len(tokenizer(prompt)["input_ids"]) == 128
    return prompt


def test_a_prompt_that_fills_the_context_is_accepted(
    bare_client: TestClient, model: MLSAETransformer
) -> None:
    prompt = context_filling_prompt(model)
    assert bare_client.post("/api/activations", json={"prompt": prompt}).status_code == 200
    longer = bare_client.post("/api/activations", json={"prompt": prompt + " ab"})
    assert longer.status_code == 422
    assert "128" in longer.json()["detail"]


# Prompts of every length ---------------------------------------------------------------------

PROMPTS_BY_LENGTH = {
    "Return": ("Return", 1),
    "newline": ("\n", 1),
    "three spaces": ("   ", 1),
    "a special token alone": ("<|endoftext|>", 1),
    "two tokens": ("a b", 2),
    "the full context": (None, 128),
}
"""A prompt (None: `context_filling_prompt`) and its number of tokens."""


@pytest.fixture(scope="module")
def shared_client(model: MLSAETransformer) -> TestClient:
    """One server for many requests, so that each prompt runs the model once."""
    return local_client(create_app(model), raise_server_exceptions=False)


def strict_json(text: str) -> object:
    """The JSON of `text`, refusing the NaN and Infinity that JSON does not have."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("length", list(PROMPTS_BY_LENGTH))
@pytest.mark.parametrize(("path", "extra"), PROMPT_ROUTES)
def test_every_prompt_route_answers_prompts_of_every_length(
    shared_client: TestClient, model: MLSAETransformer, path: str, extra: dict, length: str
) -> None:
    prompt, n_tokens = PROMPTS_BY_LENGTH[length]
    prompt = context_filling_prompt(model) if prompt is None else prompt
    assert token_ids(model, prompt).shape[1] == n_tokens
    response = shared_client.post(path, json={"prompt": prompt, **extra})
    assert response.status_code == 200, response.text
    body = strict_json(response.text)
    if path == "/api/tokenize":
        assert len(body["tokens"]) == n_tokens
    if path == "/api/py/prompt/latent-activations":
        assert len(body["values"][0]) == n_tokens


@pytest.mark.parametrize("length", list(PROMPTS_BY_LENGTH))
def test_the_opening_prompt_route_answers_prompts_of_every_length(
    model: MLSAETransformer, length: str
) -> None:
    prompt, n_tokens = PROMPTS_BY_LENGTH[length]
    prompt = context_filling_prompt(model) if prompt is None else prompt
    client = local_client(create_app(model, opening_prompt=prompt), raise_server_exceptions=False)
    response = client.get("/api/opening-prompt")
    assert response.status_code == 200, response.text
    assert strict_json(response.text) == {
        "prompt": prompt,
        "source": "option",
        "latent": None,
        "layer": None,
    }
    tokens = post(client, "/api/tokenize", prompt=prompt)["tokens"]
    assert len(tokens) == n_tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 3, None])
@pytest.mark.parametrize("with_examples", [True, False], ids=["example", "fallback"])
def test_the_chosen_opening_prompt_fits_the_longest_prompt(
    model: MLSAETransformer, examples_db: Path, max_tokens: int | None, with_examples: bool
) -> None:
    app = create_app(model, examples_db if with_examples else None, max_prompt_tokens=max_tokens)
    client = local_client(app, raise_server_exceptions=False)
    response = client.get("/api/opening-prompt")
    assert response.status_code == 200, response.text
    prompt = strict_json(response.text)["prompt"]
    assert 1 <= token_ids(model, prompt).shape[1] <= (max_tokens or 128)
    response = client.post("/api/activations", json={"prompt": prompt})
    assert response.status_code == 200, response.text


# Caching -------------------------------------------------------------------------------------


class Counter:
    """Wraps a method of an object and counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        wrapped = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def test_one_forward_pass_per_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    stream_calls = Counter(monkeypatch, model, "residual_stream")
    autoencoder_calls = Counter(monkeypatch, model.autoencoder, "forward")
    splice_calls = Counter(monkeypatch, model.transformer, "forward_at_layer")
    client = local_client(create_app(model))
    post(client, "/api/metrics", prompt=PROMPT)  # a splice per layer, once
    post(client, "/api/py/prompt/metrics", prompt=PROMPT)
    splice_calls.calls = 0
    for _ in range(3):
        post(client, "/api/metrics", prompt=PROMPT)
        post(client, "/api/py/prompt/metrics", prompt=PROMPT)
        post(client, "/api/tokenize", prompt=PROMPT)
        post(client, "/api/activations", prompt=PROMPT)
        post(client, "/api/latent", prompt=PROMPT, latent=5)
        post(client, "/api/histograms", prompt=PROMPT)
        post(client, "/api/py/prompt/latent-activations", prompt=PROMPT)
        post(client, "/api/py/prompt/layer-histograms", prompt=PROMPT)
        post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=1)
        post(client, "/api/logits/steering", prompt=PROMPT, layer=1, latent=2, factor=2.0)
    assert stream_calls.calls == 1
    assert autoencoder_calls.calls == 1
    assert splice_calls.calls == 2  # one reconstruction, one steering

    post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=2)
    assert splice_calls.calls == 3
    post(client, "/api/activations", prompt="Another prompt.")
    assert stream_calls.calls == 2


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    stream_calls = Counter(monkeypatch, model, "residual_stream")
    app = create_app(model, cache_size=2)
    client = local_client(app)
    for prompt in ("one", "two", "three"):
        post(client, "/api/activations", prompt=prompt)
    assert len(app.state.service.analyses) == 2
    post(client, "/api/activations", prompt="three")
    assert stream_calls.calls == 3
    post(client, "/api/activations", prompt="one")
    assert stream_calls.calls == 4


def test_lru_cache_evicts_the_least_recently_used() -> None:
    cache = LRUCache(2)
    cache.get_or_compute("a", lambda: 1)
    cache.get_or_compute("b", lambda: 2)
    assert cache.get_or_compute("a", lambda: -1) == 1
    cache.get_or_compute("c", lambda: 3)
    assert "a" in cache and "c" in cache and "b" not in cache
    assert (cache.hits, cache.misses) == (1, 3)


# The original's routes -------------------------------------------------------------------------

LOGIT_KEYS = {"id", "token", "logit", "prob"}
EXAMPLE_KEYS = {"latent", "layer", "token_id", "token", "act", "token_ids", "tokens", "acts"}


def check_logit_rows(rows: list, n_positions: int, with_probs: bool) -> None:
    assert len(rows) == n_positions
    for row in rows:
        assert len(row) == 16
        for logit in row:
            assert set(logit) == LOGIT_KEYS
            assert isinstance(logit["id"], int) and isinstance(logit["token"], str)
            assert (logit["prob"] is not None) == with_probs


def test_compat_shapes(client: TestClient, model: MLSAETransformer, examples_db: Path) -> None:
    n_positions = token_ids(model).shape[1]

    params = client.get("/api/py/params").json()
    assert params["k"] == K and params["expansion_factor"] == 2

    tokens = post(client, "/api/py/prompt/tokens", prompt=PROMPT)
    assert [set(token) for token in tokens] == [{"id", "token", "pos"}] * n_positions
    assert [token["pos"] for token in tokens] == list(range(n_positions))

    metrics = post(client, "/api/py/prompt/metrics", prompt=PROMPT)
    assert {f"train/fvu/layer_{layer}" for layer in range(N_LAYERS)} <= set(metrics)
    assert {"train/fvu/avg", "train/l0/avg", "train/mse/avg", "train/dead/rel"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())

    activations = post(client, "/api/py/prompt/latent-activations", prompt=PROMPT)
    assert set(activations) == {"values", "max"}
    values = torch.tensor(activations["values"])
    assert values.shape == (N_LAYERS, n_positions, N_LATENTS)
    assert torch.allclose(values, dense_activations(model), atol=1e-5)
    assert torch.allclose(torch.tensor(activations["max"]), values.max(-1).values)

    histograms = post(client, "/api/py/prompt/layer-histograms", prompt=PROMPT)
    assert set(histograms) == {"values", "edges"}
    assert len(histograms["edges"]) == 65
    assert [len(row) for row in histograms["values"]] == [64] * N_LAYERS
    assert all(sum(row) == n_positions * N_LATENTS for row in histograms["values"])
    assert all(isinstance(count, int) for row in histograms["values"] for count in row)

    logits = post(client, "/api/py/prompt/logits-input", prompt=PROMPT)
    assert set(logits) == {"max"}
    check_logit_rows(logits["max"], n_positions, with_probs=True)

    for path, body in (
        ("/api/py/prompt/logits-recon", {"layer": 0}),
        ("/api/py/prompt/logits-steer", {"layer": 0, "latent": 1, "factor": -2.5}),
    ):
        pair = post(client, path, prompt=PROMPT, **body)
        assert isinstance(pair, list) and len(pair) == 2
        top, changes = pair
        assert set(top) == {"max"} and set(changes) == {"max", "min"}
        check_logit_rows(top["max"], n_positions, with_probs=True)
        check_logit_rows(changes["max"], n_positions, with_probs=False)
        check_logit_rows(changes["min"], n_positions, with_probs=False)

    latent = next(row["latent"] for row in Examples(examples_db).rows() if row["layer"] == 0)
    examples = post(client, "/api/py/examples", layer=0, latent=latent)
    assert examples and all(set(example) == EXAMPLE_KEYS for example in examples)


def test_compat_layer_zero_is_layer_zero(client: TestClient) -> None:
    compat_first = post(client, "/api/py/prompt/logits-recon", prompt=PROMPT, layer=0)
    compat_last = post(client, "/api/py/prompt/logits-recon", prompt=PROMPT, layer=N_LAYERS - 1)
    first = post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=0, top_n=16)
    last = post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=N_LAYERS - 1, top_n=16)
    assert compat_first[0]["max"] == first["top"]
    assert compat_last[0]["max"] == last["top"]
    assert first["top"] != last["top"]


# The command line ------------------------------------------------------------------------------


def test_command_line_defaults() -> None:
    options = parse_args(["--repo_id", "some/model"])
    assert (options.repo_id, options.host, options.port) == ("some/model", "127.0.0.1", 8000)
    options = parse_args(["--repo_id", "x", "--host", "0.0.0.0", "--port", "9000"])
    assert (options.host, options.port) == ("0.0.0.0", 9000)


def test_mlsae_api_starts_the_same_server() -> None:
    import mlsae.api.__main__ as api_main
    import mlsae.explorer.__main__ as explorer_main

    assert api_main.main is explorer_main.main


def test_find_examples(tmp_path: Path, examples_db: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert find_examples(str(model_dir), None, str(tmp_path / "out")) is None
    assert find_examples(str(model_dir), str(examples_db), "out").path == examples_db
    cached = tmp_path / "out" / "my-model-examples.db"
    cached.parent.mkdir()
    cached.write_bytes(examples_db.read_bytes())
    assert find_examples(str(model_dir), None, str(tmp_path / "out")).path == cached
