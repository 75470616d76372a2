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

from mlsae.lm.data import (
    BadDocumentError,
    TokenBlocks,
    concat_and_tokenize,
    iter_text_groups,
    load_text_dataset,
    make_dataloader,
    max_steps,
    split_long_document,
    token_loader,
)
from mlsae.lm.token_stream import group_tokens
from mlsae.model.data import get_test_dataloader, get_train_dataloader

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
    # All 1,605 batches: the corpus is one group, `EOS + doc + EOS + doc ...` tokenised
    # once and cut into rows of 32, the last row dropped (the original's pipeline).
    with zstandard.open(GOLDENS / "corpus.jsonl.zst", "rt") as file:
        documents = [json.loads(line)["text"] for line in file]
    text = tokenizer.eos_token + tokenizer.eos_token.join(documents)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_rows = -(-len(ids) // 32) - 1
    rows = torch.tensor(ids[: n_rows * 32]).view(-1, 2, 32)
    assert torch.equal(torch.stack(batches), rows)
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
    validation = stream(token_loader(path, tokenizer, 8, 2, stop_block=9))
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
        token_loader(str(tmp_path), tokenizer, 8, 2, stop_block=10**6, split="validation")
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

    monkeypatch.setattr("mlsae.lm.documents.datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr("mlsae.lm.hub_access.offline_reason", lambda: None)  # The hub is up.
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
    with pytest.raises(ValueError, match="invalid block range"):
        token_loader(str(tmp_path / "other.jsonl"), tokenizer, 8, 2, start_block=3, stop_block=2)


def write_lines(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".zst":
        data = zstandard.ZstdCompressor(level=1).compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("bad_line", ['{"meta": {}}', '{"text": null, "meta": {}}'])
@pytest.mark.parametrize("position", ["first", "later chunk", "last"])
def test_document_without_text_names_its_file_and_line(tmp_path, bad_line, position):
    # Over 1,024 documents and over the json reader's 10 MiB chunks, so that the line sits
    # in a later group and a later chunk than the first.
    n = 2600
    filler = "lorem ipsum " * 400
    lines = [json.dumps({"text": f"{i} {filler}", "meta": {}}) for i in range(n)]
    index = {"first": 0, "later chunk": 2500, "last": n - 1}[position]
    lines[index] = bad_line
    lines.insert(10, "")  # a blank line holds no document but counts as a line
    path = write_lines(tmp_path / "docs.jsonl.zst", lines)
    assert path.stat().st_size < 10 << 20 < sum(map(len, lines))
    line = lines.index(bad_line) + 1
    with pytest.raises(BadDocumentError) as error:
        for _ in iter_text_groups(str(path)):
            pass
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert message.startswith(f"line {line} of {str(path)!r} has no text in column 'text'")
    assert "check --text_column" in message and "--skip_bad_documents" in message


def test_document_without_text_stops_the_token_stream(tmp_path, tokenizer):
    documents = make_documents(1500)
    lines = [json.dumps({"text": text}) for text in documents]
    lines[1200] = '{"text": null}'
    path = write_lines(tmp_path / "docs.jsonl", lines)
    dataset = TokenBlocks(str(path), tokenizer, 8, 2)
    with pytest.raises(BadDocumentError, match=f"line 1201 of {str(path)!r} has no text"):
        stream(make_dataloader(dataset))
    assert dataset.documents_read == 1024


def test_other_formats_name_the_document(tmp_path, tokenizer):
    documents: list[str | None] = list(make_documents(30))
    documents[7] = None
    pq.write_table(pa.table({"text": documents}), tmp_path / "docs.parquet")
    with pytest.raises(
        BadDocumentError, match=r"document 8 \(counting from 1\) of '.*docs.parquet'"
    ):
        list(iter_text_groups(str(tmp_path / "docs.parquet")))
    (tmp_path / "split").mkdir()
    pq.write_table(pa.table({"text": documents}), tmp_path / "split" / "train.parquet")
    with pytest.raises(
        BadDocumentError, match=r"document 8 \(counting from 1\) of '.*split' \(split"
    ):
        list(iter_text_groups(str(tmp_path / "split")))
    # In a glob, the file is named and the position is within it.
    write_jsonl(tmp_path / "a.jsonl", make_documents(5))
    (tmp_path / "b.jsonl").write_text('{"text": "fox"}\n{"text": 4}\n')
    with pytest.raises(BadDocumentError, match=r"line 2 of '.*b.jsonl': column 'text' holds a"):
        list(iter_text_groups(str(tmp_path / "*.jsonl")))


def test_skip_bad_documents_counts_them_and_leaves_them_out(tmp_path, tokenizer, caplog):
    documents = make_documents(1500)
    lines = [json.dumps({"text": text, "meta": {}}) for text in documents]
    bad = {0: '{"meta": {}}', 700: '{"text": null}', 1499: '{"text": null, "meta": {}}'}
    for index, line in bad.items():
        lines[index] = line
    path = write_lines(tmp_path / "docs.jsonl.zst", lines)
    clean = [text for index, text in enumerate(documents) if index not in bad]
    expected, dropped = hand_blocks(clean, tokenizer, 8, 1024)

    dataset = TokenBlocks(str(path), tokenizer, 8, 2, skip_bad_documents=True)
    with caplog.at_level("WARNING", logger="mlsae.lm.data"):
        assert stream(make_dataloader(dataset)) == expected
    assert dataset.skipped_documents == 3
    assert dataset.documents_read == len(clean)
    assert dataset.dropped_tokens == dropped
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("skipped 3 documents of") and "'text'" in warning

    for loader in (
        get_train_dataloader(str(path), tokenizer, 8, 2, skip_bad_documents=True),
        get_test_dataloader(tokenizer, 8, 2, path=str(path), skip_bad_documents=True),
    ):
        assert stream(loader) == expected
    validation = token_loader(str(path), tokenizer, 8, 2, stop_block=5, skip_bad_documents=True)
    assert stream(validation) == expected[:5]
    with pytest.raises(BadDocumentError):
        stream(get_train_dataloader(str(path), tokenizer, 8, 2))


def split_at_eos(token_ids: list[int], eos_id: int) -> list[list[int]]:
    """Per document, its tokens: the stream cut at each EOS."""
    documents: list[list[int]] = []
    for token_id in token_ids:
        if token_id == eos_id:
            documents.append([])
        else:
            documents[-1].append(token_id)
    return documents


def test_split_long_document():
    text = "one two  three\n\nfour " * 50 + "x" * 120 + " tail"
    for max_chars in (1, 7, 10, 33, 100, 200, len(text)):
        pieces = split_long_document(text, max_chars)
        assert "".join(pieces) == text
        assert all(0 < len(piece) <= max_chars for piece in pieces)
        for piece, following in zip(pieces, pieces[1:], strict=False):
            if len(piece) < max_chars:  # cut at whitespace: before its whole run
                assert following[0].isspace() and not piece[-1].isspace()
    assert split_long_document("abcdefg", 3) == ["abc", "def", "g"]
    assert split_long_document("ab cdefgh ij", 5) == ["ab", " cdef", "gh ij"]
    assert split_long_document("ab  \n cd", 4) == ["ab", "  \n ", "cd"]
    assert split_long_document("short", 10) == ["short"]


def test_long_document_keeps_the_other_documents_tokens():
    tokenizer = AutoTokenizer.from_pretrained(GOLDENS / "tiny-gpt-neox-2")
    (corpus,) = iter_text_groups(str(GOLDENS / "corpus.jsonl.zst"))
    long_document = "\n\n".join(corpus[:60])
    limit = 1000
    assert len(long_document) > 10 * limit
    texts = [*corpus[60:70], long_document, *corpus[70:75], long_document + " end"]
    whole_tokens = group_tokens(texts, tokenizer, 10**9)
    assert isinstance(whole_tokens, list)  # the group tokenised whole, as ever
    whole = split_at_eos(whole_tokens, 0)
    pieces = split_at_eos(torch.as_tensor(group_tokens(texts, tokenizer, limit)).tolist(), 0)
    assert len(pieces) == len(whole) == len(texts)
    for index, text in enumerate(texts):
        if len(text) <= limit:
            assert pieces[index] == whole[index], index
        else:
            assert tokenizer.decode(pieces[index]) == text
            assert len(pieces[index]) == pytest.approx(len(whole[index]), rel=0.01)
    # Groups without a long document keep their exact tokens.
    assert concat_and_tokenize(corpus, tokenizer, 32, max(map(len, corpus)))[0].equal(
        concat_and_tokenize(corpus, tokenizer, 32, 10**9)[0]
    )


def test_token_blocks_split_long_documents(tmp_path, tokenizer):
    documents = make_documents(40)
    documents[5] = " ".join(make_documents(100, seed=4))
    path = write_jsonl(tmp_path / "docs.jsonl", documents)
    dataset = TokenBlocks(str(path), tokenizer, 8, 2, group_size=16, max_document_chars=200)
    blocks = stream(make_dataloader(dataset))
    expected = []
    for start in range(0, 40, 16):
        group = documents[start : start + 16]
        expected += concat_and_tokenize(group, tokenizer, 8, 200)[0].tolist()
    assert blocks == expected
    # The groups without the long document are unchanged.
    unchanged = hand_blocks(documents[16:], tokenizer, 8, 16)[0]
    assert blocks[-len(unchanged) :] == unchanged
    first_group = concat_and_tokenize(documents[:16], tokenizer, 8, 200)[0].flatten().tolist()
    assert tokenizer.decode(split_at_eos(first_group, tokenizer.eos_token_id)[5]) == documents[5]
