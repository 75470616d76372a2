import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mlsae.model.data import (
    TokenBlocks,
    concat_and_tokenize,
    get_test_dataloader,
    get_train_dataloader,
    get_val_dataloader,
    iter_text_groups,
    load_text_dataset,
    make_dataloader,
    max_steps,
)

GOLDENS = Path(__file__).parent.parent / "data" / "goldens"
EOS = "<|endoftext|>"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras"


def make_documents(n: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    words = WORDS.split()
    documents = []
    for _ in range(n):
        length = int(torch.randint(1, 30, (), generator=generator))
        indices = torch.randint(0, len(words), (length,), generator=generator)
        documents.append(" ".join(words[i] for i in indices.tolist()))
    return documents


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(make_documents(200, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS)


def hand_blocks(
    documents: list[str], tokenizer: PreTrainedTokenizerFast, max_length: int, group_size: int
) -> tuple[list[list[int]], int]:
    """The expected blocks, built from each document's own tokens and the EOS id."""
    blocks, dropped = [], 0
    for start in range(0, len(documents), group_size):
        tokens = []
        for document in documents[start : start + group_size]:
            tokens.append(tokenizer.eos_token_id)
            tokens += tokenizer(document, add_special_tokens=False)["input_ids"]
        chunks = [tokens[i : i + max_length] for i in range(0, len(tokens), max_length)]
        blocks += chunks[:-1]
        dropped += len(chunks[-1])
    return blocks, dropped


def stream(dataloader) -> list[list[int]]:
    return [row for batch in dataloader for row in batch["input_ids"].tolist()]


def write_jsonl(path: Path, documents: list[str]) -> Path:
    lines = "".join(json.dumps({"text": text, "meta": {}}) + "\n" for text in documents)
    if path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def test_golden_stream():
    tokenizer = AutoTokenizer.from_pretrained(GOLDENS / "tiny-gpt-neox-2")
    expected = load_file(GOLDENS / "golden-ae.safetensors")["train.input_ids"]
    dataloader = get_test_dataloader(tokenizer, 32, 2, path=str(GOLDENS / "corpus.jsonl.zst"))
    batches = [batch["input_ids"] for batch in dataloader]
    assert len(batches) == 1605
    assert all(batch.shape == (2, 32) and batch.dtype == torch.long for batch in batches)
    assert torch.equal(torch.stack(batches[:30]), expected)
    dataset = dataloader.dataset
    assert (dataset.documents_read, dataset.blocks_read) == (292, 3210)
    assert dataset.tokens_read == 3210 * 32 + dataset.dropped_tokens
    assert dataset.dropped_tokens == 26


def test_golden_stream_with_max_tokens_and_train_loader():
    tokenizer = str(GOLDENS / "tiny-gpt-neox-2")
    path = str(GOLDENS / "corpus.jsonl.zst")
    held_out_stream = stream(get_test_dataloader(tokenizer, 32, 2, path=path, max_tokens=256))
    train_batches = stream(get_train_dataloader(path, tokenizer, 32, 2, max_tokens=256))
    expected = load_file(GOLDENS / "golden-ae.safetensors")["train.input_ids"][:4]
    assert max_steps(256, 2, 32) == 4
    assert held_out_stream == train_batches == expected.reshape(8, 32).tolist()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".parquet", ".txt"])
def test_blocks_match_hand_computation(tmp_path, tokenizer, suffix):
    documents = make_documents(40)
    path = tmp_path / f"docs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"text": documents, "id": list(range(40))}), path)
    elif suffix == ".txt":
        path.write_text("\n".join(documents) + "\n")
    else:
        write_jsonl(path, documents)
    expected, dropped = hand_blocks(documents, tokenizer, 16, 1024)
    dataset = TokenBlocks(str(path), tokenizer, 16, 3)
    batches = [batch["input_ids"] for batch in make_dataloader(dataset)]
    assert [row for batch in batches for row in batch.tolist()] == expected
    assert [len(batch) for batch in batches] == [3] * (len(expected) // 3) + (
        [len(expected) % 3] if len(expected) % 3 else []
    )
    assert dataset.dropped_tokens == dropped
    assert dataset.documents_read == 40


def test_concat_and_tokenize_drops_last_block_even_when_complete(tokenizer):
    documents = make_documents(5)
    n_tokens = hand_blocks(documents, tokenizer, 10**6, 1024)[1]
    while n_tokens % 2:
        documents.append("fox")
        n_tokens = hand_blocks(documents, tokenizer, 10**6, 1024)[1]
    blocks, dropped = concat_and_tokenize(documents, tokenizer, n_tokens // 2)
    assert blocks.shape == (1, n_tokens // 2)
    assert dropped == n_tokens // 2
    blocks, dropped = concat_and_tokenize(documents, tokenizer, n_tokens)
    assert blocks.shape == (0, n_tokens) and dropped == n_tokens


def test_groups_of_1024_documents(tmp_path, tokenizer):
    documents = [f"fox {i}" for i in range(2500)]
    path = write_jsonl(tmp_path / "many.jsonl.zst", documents)
    expected, dropped = hand_blocks(documents, tokenizer, 7, 1024)
    dataset = TokenBlocks(str(path), tokenizer, 7, 4)
    assert stream(make_dataloader(dataset)) == expected
    assert dataset.dropped_tokens == dropped
    assert [len(group) for group in iter_text_groups(str(path))] == [1024, 1024, 452]
    one_group, _ = hand_blocks(documents, tokenizer, 7, len(documents))
    assert one_group != expected


def test_resume_continues_exactly(tmp_path, tokenizer):
    documents = make_documents(300)
    path = str(write_jsonl(tmp_path / "docs.jsonl", documents))
    full = stream(make_dataloader(TokenBlocks(path, tokenizer, 8, 2, group_size=64)))
    assert len(full) > 50
    for start in [0, 1, 5, 37, len(full) - 1, len(full)]:
        resumed = TokenBlocks(path, tokenizer, 8, 2, group_size=64, start_block=start)
        assert stream(make_dataloader(resumed)) == full[start:]

    interrupted = TokenBlocks(path, tokenizer, 8, 2, group_size=64)
    iterator = iter(make_dataloader(interrupted))
    head = [row for _ in range(7) for row in next(iterator)["input_ids"].tolist()]
    state = interrupted.state_dict()
    assert state == {"next_block": 14}
    fresh = TokenBlocks(path, tokenizer, 8, 2, group_size=64)
    fresh.load_state_dict(state)
    assert head + stream(make_dataloader(fresh)) == full

    skipped = get_train_dataloader(path, tokenizer, 8, 2, skip_batches=7)
    assert stream(skipped) == stream(get_train_dataloader(path, tokenizer, 8, 2))[14:]


def test_validation_is_disjoint_from_training(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "docs.jsonl", make_documents(200)))
    full = stream(get_train_dataloader(path, tokenizer, 8, 2))
    validation = stream(get_val_dataloader(path, tokenizer, 8, 2, val_blocks=9))
    training = stream(get_train_dataloader(path, tokenizer, 8, 2, val_blocks=9))
    assert validation == full[:9]
    assert training == full[9:]
    resumed = stream(get_train_dataloader(path, tokenizer, 8, 2, val_blocks=9, skip_batches=3))
    assert resumed == full[15:]


def test_validation_from_another_split(tmp_path, tokenizer):
    train_documents, val_documents = make_documents(50, seed=2), make_documents(50, seed=3)
    write_jsonl(tmp_path / "train.jsonl.zst", train_documents)
    write_jsonl(tmp_path / "validation.jsonl.zst", val_documents)
    training = stream(get_train_dataloader(str(tmp_path), tokenizer, 8, 2))
    validation = stream(
        get_val_dataloader(str(tmp_path), tokenizer, 8, 2, val_blocks=10**6, split="validation")
    )
    assert training == hand_blocks(train_documents, tokenizer, 8, 1024)[0]
    assert validation == hand_blocks(val_documents, tokenizer, 8, 1024)[0]


def test_max_tokens(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "docs.jsonl", make_documents(300)))
    full = stream(get_train_dataloader(path, tokenizer, 8, 2))
    dataloader = get_train_dataloader(path, tokenizer, 8, 2, max_tokens=100)
    batches = list(dataloader)
    assert max_steps(100, 2, 8) == 6 == len(batches) == dataloader.dataset.max_batches
    assert sum(batch["input_ids"].numel() for batch in batches) <= 100
    assert stream(batches) == full[:12]
    small_groups = stream(make_dataloader(TokenBlocks(path, tokenizer, 8, 2, group_size=32)))
    bounded = TokenBlocks(path, tokenizer, 8, 2, group_size=32, stop_block=12)
    assert stream(make_dataloader(bounded)) == small_groups[:12]
    assert bounded.documents_read < 300
    resumed = get_train_dataloader(path, tokenizer, 8, 2, max_tokens=100, skip_batches=4)
    assert stream(resumed) == full[8:12]
    with_val = get_train_dataloader(path, tokenizer, 8, 2, max_tokens=100, val_blocks=5)
    assert stream(with_val) == full[5:17]
    held_out_stream = stream(get_test_dataloader(tokenizer, 8, 2, path=path, max_tokens=100))
    assert held_out_stream == full[:12]


def test_directories_globs_and_symlinks(tmp_path, tokenizer):
    documents = make_documents(30)
    write_jsonl(tmp_path / "real.jsonl.zst", documents)
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "real.jsonl.zst", tmp_path / "dir" / "train.jsonl.zst")
    os.symlink(tmp_path / "real.jsonl.zst", tmp_path / "link.jsonl.zst")
    expected = hand_blocks(documents, tokenizer, 8, 1024)[0]
    for path in ["dir", "link.jsonl.zst", "re*.jsonl.zst"]:
        loader = get_train_dataloader(str(tmp_path / path), tokenizer, 8, 2)
        assert stream(loader) == expected, path


def test_text_column_is_configurable(tmp_path, tokenizer):
    documents = make_documents(20)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": text}) + "\n" for text in documents))
    loader = get_train_dataloader(str(path), tokenizer, 8, 2, text_column="content")
    assert stream(loader) == hand_blocks(documents, tokenizer, 8, 1024)[0]


def test_workers_give_the_same_batches(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "docs.jsonl", make_documents(100)))
    expected = [batch["input_ids"] for batch in get_train_dataloader(path, tokenizer, 8, 3)]
    got = [
        batch["input_ids"] for batch in get_train_dataloader(path, tokenizer, 8, 3, num_workers=2)
    ]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_hub_ids_are_not_local_paths(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return "stream"

    monkeypatch.setattr("mlsae.model.data.datasets.load_dataset", fake_load_dataset)
    assert load_text_dataset("monology/pile-uncopyrighted") == "stream"
    assert calls == [
        ("monology/pile-uncopyrighted", {"name": None, "split": "train", "streaming": True})
    ]


def test_errors(tmp_path, tokenizer):
    def first(path: Path | str, **kwargs):
        return next(iter(get_train_dataloader(str(path), tokenizer, 8, 2, **kwargs)))

    with pytest.raises(FileNotFoundError, match="no such file"):
        first(tmp_path / "missing.jsonl.zst")
    with pytest.raises(FileNotFoundError, match="no such file"):
        first("./missing")
    with pytest.raises(FileNotFoundError, match="no files match"):
        first(tmp_path / "*.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable data files"):
        first(tmp_path / "empty_dir")

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        first(tmp_path / "empty.jsonl")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        first(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('not json\n{"text": 1')
    with pytest.raises(ValueError, match="could not read"):
        first(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(ValueError, match="could not read"):
        first(tmp_path / "bad.jsonl.zst")
    (tmp_path / "other.jsonl").write_text('{"content": "a fox"}\n')
    with pytest.raises(ValueError, match="no column 'text'"):
        first(tmp_path / "other.jsonl")
    (tmp_path / "numbers.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="not text"):
        first(tmp_path / "numbers.jsonl")
    (tmp_path / "data.csv").write_text("text\na fox\n")
    with pytest.raises(ValueError, match="unsupported"):
        first(tmp_path / "*.csv")

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="eos_token"):
        TokenBlocks(str(tmp_path / "other.jsonl"), no_eos, 8, 2)
    with pytest.raises(ValueError, match="positive"):
        TokenBlocks(str(tmp_path / "other.jsonl"), tokenizer, 0, 2)
    with pytest.raises(ValueError, match="val_blocks"):
        get_val_dataloader(str(tmp_path / "other.jsonl"), tokenizer, 8, 2, val_blocks=0)
