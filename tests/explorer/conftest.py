"""A tiny random MLSAE over the golden GPT-NeoX and an examples database made from it."""

import json
import sqlite3
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlsae.analysis.examples import collect_examples, write_db
from mlsae.analysis.source import MLSAESource
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS

PROMPT = "The cat sat on the mat."

PROMPT_ROUTES = [
    ("/api/tokenize", {}),
    ("/api/metrics", {}),
    ("/api/activations", {}),
    ("/api/latent", {"latent": 0}),
    ("/api/histograms", {}),
    ("/api/logits", {}),
    ("/api/logits/reconstruction", {"layer": 0}),
    ("/api/logits/steering", {"latent": 0, "layer": 0}),
    ("/api/py/prompt/tokens", {}),
    ("/api/py/prompt/metrics", {}),
    ("/api/py/prompt/latent-activations", {}),
    ("/api/py/prompt/layer-histograms", {}),
    ("/api/py/prompt/logits-input", {}),
    ("/api/py/prompt/logits-recon", {"layer": 0}),
    ("/api/py/prompt/logits-steer", {"latent": 0, "layer": 0, "factor": 1}),
]
"""Every route that takes a prompt, with the other fields it needs."""

TEXTS = [
    PROMPT,
    "A dog ran in the park and the cat watched.",
    "Numbers such as 1, 2 and 3 are small.",
    "def add(a, b):\n    return a + b",
]


def local_client(app: FastAPI, **kwargs) -> TestClient:
    """A test client whose requests name localhost, as a browser on this machine does
    (the explorer answers only the hosts it is told to)."""
    return TestClient(app, base_url="http://localhost", **kwargs)


def tiny_model() -> MLSAETransformer:
    torch.manual_seed(0)
    model = MLSAETransformer(
        model_name=str(GOLDENS / "tiny-gpt-neox-2"),
        expansion_factor=2,
        k=4,
        auxk=8,
        max_length=32,
    )
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="package")
def model() -> MLSAETransformer:
    return tiny_model()


@pytest.fixture(scope="package")
def examples_db(model: MLSAETransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = model.transformer.tokenizer
    batches = [{"input_ids": torch.tensor([tokenizer(text)["input_ids"]])} for text in TEXTS]
    top = collect_examples(MLSAESource(model), batches, n_examples=4, n_tokens=2)
    return write_db(top.examples(tokenizer), tmp_path_factory.mktemp("examples") / "tiny.db")


class TopExample(NamedTuple):
    latent: int
    layer: int
    text: str
    """Its context window decoded without special tokens."""


def top_example(model: MLSAETransformer, examples_db: Path, max_tokens: int = 128) -> TopExample:
    """The example with the largest activation in the database, read with plain SQL."""
    connection = sqlite3.connect(examples_db)
    try:
        latent, layer, token_ids = connection.execute(
            "SELECT latent, layer, token_ids FROM examples ORDER BY act DESC, id LIMIT 1"
        ).fetchone()
    finally:
        connection.close()
    ids = json.loads(token_ids)[:max_tokens]
    text = model.transformer.tokenizer.decode(ids, skip_special_tokens=True)
    return TopExample(latent, layer, text)
