import json
import sqlite3
from collections import defaultdict

import datasets
import numpy as np
import pytest
import torch

from mlsae.analysis.examples import (
    COLUMNS,
    Example,
    Examples,
    TopExamples,
    collect_examples,
    main,
    write_db,
)
from mlsae.analysis.source import LatentBatch
from mlsae.model.data import get_train_dataloader
from mlsae.model.types import TopK
from tests.analysis import (
    CORPUS,
    GOLDEN_MODEL,
    GOLDEN_TRANSFORMER,
    TOKENS_PER_BATCH,
    golden_source,
    golden_tokenizer,
    random_latents,
)
from tests.goldens import GOLDENS

GOLDEN_BATCHES = 6  # The original processed max_steps + 2 = 6 batches (fault 17).


def fp16(value: float) -> float:
    return float(np.float16(value))


def grouped(rows: list[dict], key) -> dict[tuple[int, int], list]:
    groups = defaultdict(list)
    for row in rows:
        groups[row["latent"], row["layer"]].append(key(row))
    return groups


@pytest.fixture(scope="module")
def golden_examples() -> list[Example]:
    source = golden_source()
    batches = get_train_dataloader(
        str(CORPUS), source.tokenizer, 32, 2, max_tokens=GOLDEN_BATCHES * TOKENS_PER_BATCH
    )
    top = collect_examples(source, batches, n_examples=4, n_tokens=3)
    return list(top.examples(source.tokenizer))


def test_examples_match_golden(golden_examples):
    with open(GOLDENS / "examples_rows.jsonl") as file:
        golden_rows = [json.loads(line) for line in file]
    with open(GOLDENS / "examples_cut_ties.json") as file:
        ties = {tuple(group) for group in json.load(file)["groups"]}

    def identity(row: dict) -> tuple:
        return row["token_id"], row["token"], fp16(row["act"])

    expected = grouped(golden_rows, identity)
    actual = grouped([example._asdict() for example in golden_examples], identity)
    assert actual.keys() == expected.keys()
    assert len(golden_examples) == len(golden_rows)
    for group, expected_rows in expected.items():
        if group in ties:
            assert sorted(act for *_, act in actual[group]) == sorted(
                act for *_, act in expected_rows
            ), group
        else:
            assert sorted(actual[group]) == sorted(expected_rows), group


def test_golden_windows_are_consistent(golden_examples):
    for example in golden_examples:
        assert 4 <= len(example.token_ids) <= 7
        assert len(example.tokens) == len(example.acts) == len(example.token_ids)
        assert example.token_id in example.token_ids
        assert example.act in example.acts
        assert example.act > 1e-3


def scripted_top(
    tokens: torch.Tensor, batch: LatentBatch, n_examples: int = 2, n_tokens: int = 2
) -> list[Example]:
    n_layers, n_latents = batch.topk.values.shape[0], 8
    top = TopExamples(n_layers, n_latents, n_examples, n_tokens)
    top.update(tokens, batch)
    return list(top.examples(golden_tokenizer()))


def test_windows_stay_inside_their_sequence():
    tokens = torch.arange(100, 116).view(2, 8)
    values = torch.zeros(1, 2, 8, 1)
    indices = torch.zeros(1, 2, 8, 1, dtype=torch.long)
    values[0, 1, 0, 0] = 2.0  # latent 3, the first position of sequence 1
    indices[0, 1, 0, 0] = 3
    values[0, 0, 7, 0] = 1.0  # latent 5, the last position of sequence 0
    indices[0, 0, 7, 0] = 5
    values[0, 0, 6, 0] = 0.5  # latent 5 again, beside it
    indices[0, 0, 6, 0] = 5
    examples = scripted_top(tokens, LatentBatch(TopK(values, indices), None), n_tokens=2)
    by_latent = defaultdict(list)
    for example in examples:
        by_latent[example.latent].append(example)

    (first,) = by_latent[3]
    assert first.token_id == 108
    assert first.token_ids == [108, 109, 110]  # starts at 0, does not reach sequence 0
    assert first.acts == [2.0, 0.0, 0.0]

    last, beside = by_latent[5]
    assert last.token_id == 107 and last.act == 1.0
    assert last.token_ids == [105, 106, 107]  # clipped, does not reach sequence 1
    assert last.acts == [0.0, 0.5, 1.0]
    assert beside.token_ids == [104, 105, 106, 107]
    assert beside.acts == [0.0, 0.0, 0.5, 1.0]
    assert beside.tokens == golden_tokenizer().convert_ids_to_tokens([104, 105, 106, 107])
    assert first.token == golden_tokenizer().decode(108)


def brute_force(
    tokens: torch.Tensor, batch: LatentBatch, n_examples: int, n_tokens: int
) -> dict[tuple[int, int], list[tuple]]:
    """Every counted (latent, layer, value, window) sorted, then the first n_examples."""
    values, indices = batch.topk
    n_layers, n_rows, n_positions, k = values.shape
    candidates = defaultdict(list)
    for layer in range(n_layers):
        for row in range(n_rows):
            for pos in range(n_positions):
                if batch.mask is not None and not batch.mask[row, pos]:
                    continue
                for slot in range(k):
                    value = fp16(values[layer, row, pos, slot])
                    if value <= fp16(1e-3):
                        continue
                    latent = int(indices[layer, row, pos, slot])
                    window = range(max(0, pos - n_tokens), min(n_positions, pos + n_tokens + 1))
                    acts = []
                    for other in window:
                        act = 0.0
                        if batch.mask is None or batch.mask[row, other]:
                            hits = indices[layer, row, other] == latent
                            if hits.any():
                                act = fp16(values[layer, row, other][hits].item())
                        acts.append(act)
                    window_ids = [int(tokens[row, other]) for other in window]
                    candidates[latent, layer].append(
                        (value, int(tokens[row, pos]), window_ids, acts)
                    )
    return {
        group: sorted(found, key=lambda item: -item[0])[:n_examples]
        for group, found in candidates.items()
    }


@pytest.mark.parametrize("with_mask", [False, True])
def test_streaming_top_n_equals_brute_force(with_mask):
    generator = torch.Generator().manual_seed(5 + with_mask)
    n_layers, n_latents, n_examples, n_tokens = 2, 6, 3, 2
    top = TopExamples(n_layers, n_latents, n_examples, n_tokens)
    all_tokens, all_batches = [], []
    for step in range(3):
        # Token ids identify positions, so examples can be matched without ties.
        tokens = torch.arange(2 * 7).view(2, 7) + 14 * step
        mask = torch.rand(2, 7, generator=generator) > 0.25 if with_mask else None
        batch = random_latents(n_layers, 2, 7, n_latents, 3, generator, mask)
        top.update(tokens, batch)
        all_tokens.append(tokens)
        all_batches.append(batch)
    joined_mask = None
    if with_mask:
        joined_mask = torch.cat([batch.mask for batch in all_batches])
    joined = LatentBatch(
        TopK(
            torch.cat([batch.topk.values for batch in all_batches], dim=1),
            torch.cat([batch.topk.indices for batch in all_batches], dim=1),
        ),
        joined_mask,
    )
    expected = brute_force(torch.cat(all_tokens), joined, n_examples, n_tokens)

    actual = defaultdict(list)
    for example in top.examples(golden_tokenizer()):
        actual[example.latent, example.layer].append(
            (example.act, example.token_id, example.token_ids, example.acts)
        )
    assert actual == expected
    if with_mask:
        excluded = set(torch.cat(all_tokens)[~joined_mask].tolist())
        assert excluded
        assert not {token_id for found in actual.values() for _, token_id, _, _ in found} & excluded
    assert top.values.shape == (n_layers * n_latents, n_examples)


def test_write_get_export_import(tmp_path):
    generator = torch.Generator().manual_seed(7)
    tokens = torch.arange(2 * 8).view(2, 8) + 40
    top = TopExamples(2, 6, 3, 2)
    top.update(tokens, random_latents(2, 2, 8, 6, 3, generator))
    examples = list(top.examples(golden_tokenizer()))
    db_path = write_db(examples, tmp_path / "model-examples.db")

    with Examples(db_path) as opened:
        assert len(opened) == len(examples)
        for layer in range(2):
            for latent in range(6):
                got = opened.get(layer, latent)
                acts = [example.act for example in got]
                assert acts == sorted(acts, reverse=True)
                assert all(e.layer == layer and e.latent == latent for e in got)
                expected = [e for e in examples if e.layer == layer and e.latent == latent]
                assert sorted(got) == sorted(expected)
        dataset = opened.to_dataset()
        assert dataset.column_names == list(COLUMNS)
        assert isinstance(dataset[0]["token_ids"], str)
        assert json.loads(dataset[0]["token_ids"]) == examples[0].token_ids

    indexes = sqlite3.connect(db_path).execute("PRAGMA index_list(examples)").fetchall()
    (index_name,) = [index[1] for index in indexes]
    columns = sqlite3.connect(db_path).execute(f"PRAGMA index_info({index_name})").fetchall()
    assert [column[2] for column in columns] == ["latent", "layer"]

    dataset.to_json(tmp_path / "published.jsonl")
    dataset.save_to_disk(tmp_path / "saved")
    for source in (tmp_path / "published.jsonl", tmp_path / "saved"):
        with Examples(source, output_dir=tmp_path / f"cache-{source.name}") as imported:
            assert list(imported.rows()) == list(Examples(db_path).rows())


def test_import_published_golden_rows(tmp_path):
    rows = datasets.load_dataset(
        "json", data_files=str(GOLDENS / "examples_rows.jsonl"), split="train"
    )
    with Examples(GOLDENS / "examples_rows.jsonl", output_dir=tmp_path) as imported:
        assert imported.path.parent == tmp_path
        assert len(imported) == len(rows)
        first = rows[0]
        (match,) = [
            example
            for example in imported.get(first["layer"], first["latent"])
            if example.token_id == first["token_id"] and example.act == first["act"]
        ]
        assert match.token_ids == json.loads(first["token_ids"])
        assert [row["id"] for row in imported.rows()][:3] == rows["id"][:3]


def test_command_writes_the_cache(tmp_path):
    common = [
        f"--repo_id={GOLDEN_MODEL}",
        f"--model_name={GOLDEN_TRANSFORMER}",
        f"--path={CORPUS}",
        "--max_length=32",
        "--batch_size=2",
        "--n_examples=2",
        "--n_tokens=1",
        "--device=cpu",
        f"--output_dir={tmp_path}",
    ]
    with main([*common, f"--max_tokens={TOKENS_PER_BATCH}"]) as examples:
        assert examples.path == tmp_path / "mlsae-tfm-trained-examples.db"
        rows = list(examples.rows())
    assert rows
    # Special tokens (EOS) do not count by default.
    assert all(row["token_id"] != 0 for row in rows)
    assert all(len(json.loads(row["token_ids"])) <= 3 for row in rows)
    with Examples(str(GOLDEN_MODEL), output_dir=str(tmp_path)) as cached:
        assert len(cached) == len(rows)

    # Counting them reproduces the original's EOS rows.
    with main([*common, f"--max_tokens={TOKENS_PER_BATCH}", "--count_special_tokens=true"]) as e:
        assert any(row["token_id"] == 0 for row in e.rows())


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--repo_id", "--n_examples", "--n_tokens", "--path", "--max_tokens"):
        assert option in help_text
    assert "monology/pile-uncopyrighted" in "".join(help_text.split())


def test_get_rejects_layers_and_latents_out_of_range(tmp_path):
    example = Example(3, 1, 5, "x", 1.5, [5], ["x"], [1.5])
    path = write_db([example], tmp_path / "shaped.db", n_layers=2, n_latents=4)
    with Examples(path) as opened:
        assert opened.shape() == (2, 4)
        assert opened.get(1, 3) == [example]
        with pytest.raises(ValueError, match="layer 2 is out of range"):
            opened.get(2, 3)
        with pytest.raises(ValueError, match="latent 4 is out of range"):
            opened.get(0, 4)
        with pytest.raises(ValueError, match="non-negative"):
            opened.get(-1, 0)
