import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae.analysis.geometry import COLUMNS, main, residual_geometry
from mlsae.lm.transformer import Transformer
from mlsae.model.data import get_test_dataloader
from tests.analysis import CORPUS, GOLDEN_MODEL, GOLDEN_TRANSFORMER, TOKENS_PER_BATCH

QUICKSTART = Path(__file__).parents[2] / "quickstart"
OPTIONS = (
    "--model_name",
    "--repo_id",
    "--layers",
    "--centre",
    "--path",
    "--max_tokens",
    "--count_special_tokens",
    "--output_dir",
    "--device",
)


@pytest.fixture(scope="module")
def transformer() -> Transformer:
    return Transformer(str(GOLDEN_TRANSFORMER))


@pytest.fixture(scope="module")
def batches(transformer: Transformer) -> list[dict[str, torch.Tensor]]:
    return list(
        get_test_dataloader(
            transformer.tokenizer, 32, 2, path=str(CORPUS), max_tokens=3 * TOKENS_PER_BATCH
        )
    )


def stacked_vectors(transformer: Transformer, tokens: torch.Tensor, with_special: bool):
    """Embeddings and every block output as float64 numpy `[layer, token, d]`, directly."""
    embeddings = transformer.model.gpt_neox.embed_in(tokens)
    stack = torch.stack([embeddings, *transformer.hidden_states(tokens)]).double().numpy()
    keep = np.ones(tokens.shape, bool)
    if not with_special:
        keep = (tokens != transformer.tokenizer.eos_token_id).numpy()
    return stack[:, keep]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def direct_rows(stacks: list[np.ndarray], centre: str) -> list[dict]:
    stack = np.concatenate(stacks, axis=1)
    if centre == "stream":
        centred = stack - stack.mean(1, keepdims=True)
    else:
        centred = np.concatenate([s - s.mean(1, keepdims=True) for s in stacks], axis=1)
    rows = []
    for row in range(len(stack)):
        values = {"layer": row - 1, "tokens": stack.shape[1]}
        values["norm"] = np.linalg.norm(stack[row], axis=-1).mean()
        if row + 1 < len(stack):
            cos_sim = cosine(stack[row], stack[row + 1])
            centred_cos_sim = cosine(centred[row], centred[row + 1])
            values |= {
                "cos_sim": cos_sim.mean(),
                "cos_sim_std": cos_sim.std(ddof=1),
                "centred_cos_sim": centred_cos_sim.mean(),
                "centred_cos_sim_std": centred_cos_sim.std(ddof=1),
            }
        rows.append(values)
    return rows


def assert_rows_match(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for row, expected_row in zip(rows, expected, strict=True):
        assert list(row) == list(COLUMNS)
        for name in COLUMNS:
            if name == "block":
                continue
            if name in expected_row and not math.isnan(expected_row[name]):
                assert row[name] == pytest.approx(expected_row[name], rel=1e-5, abs=1e-6), name
            else:
                assert math.isnan(row[name]), name


@pytest.mark.parametrize("centre", ["stream", "batch"])
@pytest.mark.parametrize("with_special", [False, True])
def test_matches_direct_computation(transformer, batches, centre, with_special):
    rows = residual_geometry(transformer, batches, centre=centre, count_special_tokens=with_special)
    stacks = [stacked_vectors(transformer, b["input_ids"], with_special) for b in batches]
    assert_rows_match(rows, direct_rows(stacks, centre))
    assert [row["block"] for row in rows] == [-1, 0, 1, 2, 3]
    n_special = sum(int((b["input_ids"] == 0).sum()) for b in batches)
    assert n_special > 0
    expected_tokens = 3 * TOKENS_PER_BATCH - (0 if with_special else n_special)
    assert rows[0]["tokens"] == expected_tokens


def test_stream_centring_needs_reiterable_batches(transformer, batches):
    with pytest.raises(ValueError, match="re-iterable"):
        residual_geometry(transformer, iter(batches))
    rows = residual_geometry(transformer, iter(batches), centre="batch")
    assert rows[0]["tokens"] > 0


def test_command_on_a_transformer_alone(tmp_path):
    rows = main(
        [
            f"--model_name={QUICKSTART / 'model'}",
            f"--path={QUICKSTART / 'data' / 'test.jsonl.zst'}",
            "--max_length=64",
            "--batch_size=2",
            "--max_tokens=300",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    assert len(rows) == 5
    assert rows[0]["tokens"] <= 256
    with open(tmp_path / "model-geometry.csv") as file:
        saved = list(csv.DictReader(file))
    assert [int(row["layer"]) for row in saved] == [-1, 0, 1, 2, 3]
    assert float(saved[1]["centred_cos_sim"]) == pytest.approx(rows[1]["centred_cos_sim"])

    transformer = Transformer(str(QUICKSTART / "model"))
    quickstart_batches = get_test_dataloader(
        transformer.tokenizer,
        64,
        2,
        path=str(QUICKSTART / "data" / "test.jsonl.zst"),
        max_tokens=300,
    )
    stacks = [stacked_vectors(transformer, b["input_ids"], False) for b in quickstart_batches]
    assert len(stacks) == 2
    assert_rows_match(rows, direct_rows(stacks, "stream"))


def test_command_on_a_pretrained_model(tmp_path, transformer, batches):
    rows = main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--path={CORPUS}",
            "--max_length=32",
            "--batch_size=2",
            f"--max_tokens={3 * TOKENS_PER_BATCH}",
            "--centre=batch",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    # The checkpoint holds the transformer's weights: the same as the golden transformer's.
    expected = residual_geometry(transformer, batches, centre="batch")
    assert_rows_match(rows, [{k: v for k, v in row.items() if k != "block"} for row in expected])
    assert (tmp_path / "mlsae-tfm-trained-geometry.csv").exists()


def test_selected_layers_in_stack_order(batches):
    transformer = Transformer(str(GOLDEN_TRANSFORMER), layers=[2, 0])
    rows = residual_geometry(transformer, batches[:2])
    assert [row["block"] for row in rows] == [-1, 2, 0]
    stacks = [stacked_vectors(transformer, b["input_ids"], False)[[0, 3, 1]] for b in batches[:2]]
    assert_rows_match(rows, direct_rows(stacks, "stream"))


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in help_text
