"""The committed quick start (`quickstart/`) and the script that builds it."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlsae.lm.data import TokenBlocks

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "quickstart"
SCRIPT = REPO / "scripts" / "build_quickstart.py"
SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"


def read_documents(path: Path) -> list[dict]:
    with path.open("rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as reader:
        return [json.loads(line) for line in io.TextIOWrapper(reader, encoding="utf-8")]


def check_layout(output: Path) -> None:
    model_dir = output / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    for split in SPLITS:
        assert (output / "data" / f"{split}.jsonl.zst").is_file(), split
    assert (output / "README.md").is_file()


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(str(QUICKSTART / "model")).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))


def test_layout_and_sizes():
    check_layout(QUICKSTART)
    assert (QUICKSTART / "model" / "model.safetensors").stat().st_size <= 6_000_000
    corpus = sum((QUICKSTART / "data" / f"{split}.jsonl.zst").stat().st_size for split in SPLITS)
    assert corpus <= 1_500_000


def test_tokenizer(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == EOS
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    assert tokenizer.convert_ids_to_tokens(0) == EOS
    text = "Return the sum of a list of numbers.\n\n>>> sum([1, 2])\n3"
    ids = tokenizer(EOS + text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tokenizer.decode(ids[1:]) == text


def test_model(model, tokenizer):
    config = model.config
    assert config.model_type == "gpt_neox"
    assert config.bos_token_id == config.eos_token_id == 0
    assert config.vocab_size == len(tokenizer)
    assert config.max_position_embeddings == tokenizer.model_max_length
    assert not config.tie_word_embeddings
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_corpus_splits_are_disjoint_documents():
    texts = {}
    for split in SPLITS:
        documents = read_documents(QUICKSTART / "data" / f"{split}.jsonl.zst")
        assert documents
        assert all(set(document) == {"text", "meta"} for document in documents)
        assert all(isinstance(document["text"], str) and document["text"] for document in documents)
        texts[split] = {document["text"] for document in documents}
        assert len(texts[split]) == len(documents)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert len(texts["train"]) > 10 * len(texts["validation"])


def test_model_predicts_validation_text(model, tokenizer):
    """The loss on validation blocks, read as the library reads them, is far below chance."""
    blocks = TokenBlocks(
        str(QUICKSTART / "data"),
        tokenizer,
        max_length=model.config.max_position_embeddings,
        batch_size=8,
        split="validation",
        stop_block=8,
    )
    batch = next(iter(blocks))["input_ids"]
    assert batch.shape == (8, model.config.max_position_embeddings)
    assert (batch == 0).any()
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    assert loss < 0.6 * math.log(model.config.vocab_size)


def test_build_script_smoke(tmp_path):
    output = tmp_path / "quickstart"
    command = [
        sys.executable,
        str(SCRIPT),
        "--output",
        str(output),
        "--max_documents",
        "300",
        "--vocab_size",
        "300",
        "--steps",
        "2",
        "--context_length",
        "32",
        "--batch_size",
        "4",
        "--hidden_size",
        "32",
        "--threads",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation loss" in result.stdout
    check_layout(output)
    model = AutoModelForCausalLM.from_pretrained(str(output / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(output / "model"))
    assert model.config.vocab_size == len(tokenizer) == 300
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    n_documents = sum(
        len(read_documents(output / "data" / f"{split}.jsonl.zst")) for split in SPLITS
    )
    assert n_documents == 300
