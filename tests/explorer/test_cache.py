"""The explorer's caches: what an entry costs, and that they stay within their bytes."""

import logging
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from mlsae.explorer import create_app
from mlsae.explorer.__main__ import build_app, parse_args
from mlsae.explorer.cache import LRUCache, nbytes
from mlsae.explorer.service import ExplorerService
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import PROMPT, local_client

N_LAYERS, K, D_MODEL, VOCAB = 4, 4, 48, 512
TOP_N = 100
PYTHON_OVERHEAD = 4096
"""Room for the Python objects around an entry's tensors: its key, tuples, a dataclass."""


def post(client: TestClient, path: str, **body) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def n_positions(model: MLSAETransformer, prompt: str = PROMPT) -> int:
    return len(model.transformer.tokenizer(prompt)["input_ids"])


# Measuring ----------------------------------------------------------------------------------


def test_nbytes_counts_each_storage_once() -> None:
    floats = torch.zeros(100, dtype=torch.float32)
    longs = torch.zeros(10, 10, dtype=torch.int64)
    assert nbytes(floats) == 100 * 4
    assert nbytes(floats[:10]) == 100 * 4  # a view keeps its whole storage alive
    triple = (floats, floats, floats[50:])
    assert nbytes(triple) == sys.getsizeof(triple) + 100 * 4
    mapping = {"x": longs, "y": 1.5}
    python = sum(sys.getsizeof(item) for item in (mapping, "x", "y", 1.5))
    assert nbytes(mapping) == python + 100 * 8
    with pytest.raises(TypeError, match="cannot measure"):
        nbytes(object())


def test_a_logits_entry_costs_its_top_entries(model: MLSAETransformer) -> None:
    app = create_app(model)
    post(local_client(app), "/api/logits", prompt=PROMPT, top_n=TOP_N)
    results = app.state.service.results
    [key] = results.keys()
    payload = n_positions(model) * TOP_N * (4 + 4 + 4)  # int32 ids, float32 logits and probs
    assert payload <= results.size_of(key) <= payload + PYTHON_OVERHEAD
    assert results.size_of(key) < n_positions(model) * VOCAB * 4  # not the dense logits


def test_an_intervention_entry_costs_its_top_entries(model: MLSAETransformer) -> None:
    app = create_app(model)
    client = local_client(app)
    post(client, "/api/logits/reconstruction", prompt=PROMPT, layer=1, top_n=TOP_N)
    post(client, "/api/logits/steering", prompt=PROMPT, layer=1, latent=2, top_n=TOP_N)
    results = app.state.service.results
    pos = n_positions(model)
    top, changes, kl_div = pos * TOP_N * 12, 2 * pos * TOP_N * 8, pos * 4
    payload = top + changes + kl_div
    for key in results.keys():
        assert payload <= results.size_of(key) <= payload + PYTHON_OVERHEAD, key[0]


def test_an_analysis_entry_costs_its_tensors(model: MLSAETransformer) -> None:
    service = ExplorerService(model)
    service.analyse(PROMPT)
    pos = n_positions(model)
    # Raw, encoded inputs, reconstructions (in the autoencoder's space the same tensor as
    # in the transformer's, without a tuned lens).
    streams = 3 * N_LAYERS * pos * D_MODEL * 4
    latents = N_LAYERS * pos * K * (4 + 8)  # values, int64 indices
    scale = N_LAYERS * pos * 4  # the std that standardisation removed
    positions = pos * (8 + 1 + 1)  # token ids, the special and counted masks
    payload = streams + latents + scale + positions
    recorded = service.analyses.size_of(PROMPT)
    assert payload <= recorded <= payload + sys.getsizeof(PROMPT) + PYTHON_OVERHEAD


# Evicting -----------------------------------------------------------------------------------


def test_the_least_recently_used_go_first_once_over_the_bytes() -> None:
    cache = LRUCache(max_bytes=100, sizeof=lambda key, value: value)
    cache.put("a", 40)
    cache.put("b", 40)
    assert cache.get_or_compute("a", lambda: -1) == 40  # "b" is now the oldest
    cache.put("c", 40)
    assert cache.keys() == ["a", "c"] and cache.nbytes == 80 and cache.evictions == 1
    assert cache.get_or_compute("d", lambda: 150) == 150  # larger than the budget
    assert cache.keys() == ["a", "c"] and cache.too_large == 1
    cache.put("e", 100)
    assert cache.keys() == ["e"] and cache.nbytes == 100


def test_tensors_are_evicted_by_their_measured_bytes() -> None:
    entry = 1000 * 4
    cache = LRUCache(max_bytes=3 * entry + 1000)  # room for three keys, not a fourth entry
    for name in "abcde":
        cache.put(name, torch.full((1000,), 1.0))
    assert cache.keys() == ["c", "d", "e"]
    assert cache.nbytes == sum(cache.size_of(key) for key in "cde") <= cache.max_bytes


def test_the_service_keeps_within_its_cache_bytes(model: MLSAETransformer) -> None:
    probe = ExplorerService(model)
    probe.analyse("prompt number 0, a few more words")
    analysis_bytes = probe.analyses.size_of("prompt number 0, a few more words")
    budget = 4 * analysis_bytes  # three quarters, three analyses, for the forward passes
    app = create_app(model, cache_size=100, cache_bytes=budget)
    client = local_client(app)
    for index in range(10):
        prompt = f"prompt number {index}, a few more words"
        post(client, "/api/logits", prompt=prompt, top_n=TOP_N)
        post(client, "/api/logits/reconstruction", prompt=prompt, layer=0, top_n=TOP_N)
    service = app.state.service
    assert service.analyses.nbytes <= service.analyses.max_bytes == budget - budget // 4
    assert service.results.nbytes <= service.results.max_bytes == budget // 4
    kept = service.analyses.keys()
    assert 1 <= len(kept) <= 3 and kept[-1] == "prompt number 9, a few more words"
    assert service.results.evictions > 0


def test_a_forward_pass_larger_than_the_cache_is_not_kept(
    model: MLSAETransformer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(model, cache_bytes=1000)
    client = local_client(app)
    with caplog.at_level(logging.WARNING, logger="mlsae.explorer.service"):
        first = post(client, "/api/activations", prompt=PROMPT)
        second = post(client, "/api/activations", prompt=PROMPT)
    assert first == second
    service = app.state.service
    assert len(service.analyses) == 0 and service.analyses.too_large == 2
    assert sum("--cache_mb" in record.message for record in caplog.records) == 1


def test_cached_answers_are_the_first_answers(model: MLSAETransformer) -> None:
    client = local_client(create_app(model))
    for path, extra in (
        ("/api/logits", {"top_n": 7}),
        ("/api/logits/reconstruction", {"layer": 2}),
        ("/api/logits/steering", {"layer": 1, "latent": 5, "factor": -4}),
        ("/api/metrics", {}),
        ("/api/py/prompt/metrics", {}),
    ):
        assert post(client, path, prompt=PROMPT, **extra) == post(
            client, path, prompt=PROMPT, **extra
        )


# Command line -------------------------------------------------------------------------------


def test_the_cache_options_of_the_command_line(model: MLSAETransformer) -> None:
    assert parse_args(["--repo_id", "x"]).cache_mb == 512
    options = parse_args(["--repo_id", "x", "--cache_size", "3", "--cache_mb", "64"])
    service = build_app(options, model, None).state.service
    assert service.analyses.maxsize == 3
    assert service.analyses.max_bytes + service.results.max_bytes == 64 * 2**20
