import csv
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from mlsae.analysis.dists import (
    LAYER_STD_COLUMNS,
    Dists,
    DistsAccumulator,
    collect_dists,
    main,
)
from mlsae.analysis.source import LatentBatch
from mlsae.model.data import get_test_dataloader
from mlsae.model.types import TopK
from tests.analysis import (
    CORPUS,
    GOLDEN_MODEL,
    GOLDEN_TRANSFORMER,
    TOKENS_PER_BATCH,
    ScriptedSource,
    golden_source,
    random_latents,
)
from tests.goldens import GOLDENS

GOLDEN_BATCHES = 10  # The original processed max_steps + 2 = 10 batches (fault 17).
TOTALS_RTOL = 1e-6
"""How closely this machine's totals match the original's: the forward pass runs other
matmul kernels on other CPUs, so the last float32 digit of a total may differ."""


@pytest.fixture(scope="module")
def golden_run() -> tuple[Dists, list[dict]]:
    source = golden_source()
    batches = get_test_dataloader(
        source.tokenizer,
        32,
        2,
        path=str(CORPUS),
        max_tokens=GOLDEN_BATCHES * TOKENS_PER_BATCH,
    )
    return collect_dists(source, batches, log_every_n_steps=8)


def assert_same_value(actual: float, expected: float, name: str) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), name
    else:
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-7), name


def test_counts_and_totals_match_golden(golden_run):
    dists, _ = golden_run
    golden = load_file(GOLDENS / "dists.safetensors")
    assert dists.counts.sum() == GOLDEN_BATCHES * TOKENS_PER_BATCH * 4 * 6
    assert torch.equal(dists.counts, golden["counts"])
    torch.testing.assert_close(dists.totals, golden["totals"], rtol=TOTALS_RTOL, atol=1e-6)


def layer_var_atol(golden_row: dict) -> float:
    """`layer_var` is E[l^2] - E[l]^2: a relative error of the totals up to TOTALS_RTOL
    moves both terms by up to 2 * TOTALS_RTOL of E[l^2], which the subtraction keeps."""
    second_moment = golden_row["layer_var"] + golden_row["layer_mean"] ** 2
    return 4 * TOTALS_RTOL * second_moment


def assert_rows_match(rows: list[dict], golden_rows: list[dict], exact_formulas: bool) -> None:
    assert len(rows) == len(golden_rows) == 384
    for row, golden_row in zip(rows, golden_rows, strict=True):
        assert row.keys() == golden_row.keys()
        assert row["latent"] == golden_row["latent"]
        for name, expected in golden_row.items():
            where = f"{row['latent']}.{name}"
            if isinstance(expected, list):
                assert len(row[name]) == len(expected)
                for actual_item, expected_item in zip(row[name], expected, strict=True):
                    assert_same_value(actual_item, expected_item, where)
            elif exact_formulas or name not in ("layer_var", "layer_std") or math.isnan(expected):
                assert_same_value(row[name], expected, where)
            else:
                var_atol = layer_var_atol(golden_row)
                if name == "layer_var":
                    atol = var_atol
                else:  # |sqrt(a) - sqrt(b)| <= min(sqrt|a - b|, |a - b| / sqrt(b))
                    atol = min(math.sqrt(var_atol), var_atol / max(expected, 1e-30))
                assert abs(row[name] - expected) <= atol + 1e-6 * abs(expected), where


def test_rows_from_the_golden_totals_match_golden_rows():
    """The row formulas, on the original's own counts and totals, give its rows."""
    with open(GOLDENS / "dists_rows.jsonl") as file:
        golden_rows = [json.loads(line) for line in file]
    golden_dists = Dists(load_file(GOLDENS / "dists.safetensors"))
    assert_rows_match(list(golden_dists), golden_rows, exact_formulas=True)


def test_rows_match_golden(golden_run):
    dists, _ = golden_run
    with open(GOLDENS / "dists_rows.jsonl") as file:
        golden_rows = [json.loads(line) for line in file]
    rows = list(dists)
    assert_rows_match(rows, golden_rows, exact_formulas=False)
    never_fired = [row["latent"] for row in rows if row["count"] == 0]
    assert len(never_fired) == 5
    assert all(math.isnan(rows[latent]["layer_std"]) for latent in never_fired)


def test_layer_std_rows_match_golden(golden_run):
    _, rows = golden_run
    with open(GOLDENS / "dists_layer_std_step.csv") as file:
        golden_rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == [0, 8]
    assert len(rows) == len(golden_rows)
    for row, golden_row in zip(rows, golden_rows, strict=True):
        assert tuple(row) == LAYER_STD_COLUMNS == tuple(golden_row)
        assert Path(row["model_name"]).name == golden_row["model_name"]
        for name in ("n_layers", "n_latents", "expansion_factor", "k", "step", "tokens"):
            assert row[name] == int(golden_row[name]), name
        for name in ("mean", "var", "std", "sem"):
            assert math.isclose(row[name], float(golden_row[name]), rel_tol=1e-6), name


def test_latent_at_one_layer_has_std_0_and_at_two_layers_std_1():
    n_layers, n_latents = 4, 3
    counts = torch.zeros(n_layers, n_latents)
    totals = torch.zeros(n_layers, n_latents)
    counts[2, 0], totals[2, 0] = 3, 4.5  # latent 0: layer 2 only
    counts[0, 1], totals[0, 1] = 2, 3.0  # latent 1: the same totals at layers 0 and 2
    counts[2, 1], totals[2, 1] = 5, 3.0
    dists = Dists({"counts": counts, "totals": totals})
    assert dists.layer_mean[0] == 2 and dists.layer_var[0] == 0 and dists.layer_std[0] == 0
    assert dists.layer_mean[1] == 1 and dists.layer_var[1] == 1 and dists.layer_std[1] == 1
    assert torch.equal(dists.probs[:, 1], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert dists.count[1] == 7 and dists.total[1] == 6
    torch.testing.assert_close(dists.means[:, 1], torch.tensor([1.5, 0.0, 0.6, 0.0]))
    # Latent 2 never fired: 0 / 0 as published.
    assert dists.count[2] == 0 and dists.mean[2] == 0
    assert dists.probs[:, 2].isnan().all() and dists.layer_std[2].isnan()


def dense_counts_and_totals(batch: LatentBatch, n_latents: int) -> tuple[torch.Tensor, ...]:
    """Counts and totals from a dense one-hot encoding (the definition, not streamed)."""
    values, indices = batch.topk
    one_hot = torch.nn.functional.one_hot(indices, n_latents).double()  # layer b p k latent
    if batch.mask is not None:
        one_hot = one_hot * batch.mask[None, :, :, None, None]
    counts = one_hot.sum((1, 2, 3))
    totals = (one_hot * values.double()[..., None]).sum((1, 2, 3))
    return counts, totals


def test_mask_excludes_positions():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 8, generator=generator) > 0.3
    batch = random_latents(3, 2, 8, 16, 4, generator, mask)
    accumulator = DistsAccumulator(3, 16)
    accumulator.update(batch)
    counts, totals = dense_counts_and_totals(batch, 16)
    assert torch.equal(accumulator.counts, counts.long())
    torch.testing.assert_close(accumulator.totals.double(), totals, rtol=1e-6, atol=1e-6)
    assert accumulator.tokens == int(mask.sum())
    assert accumulator.counts.sum() == int(mask.sum()) * 3 * 4

    masked_out = LatentBatch(batch.topk, ~mask)
    other = DistsAccumulator(3, 16)
    other.update(masked_out)
    everything = DistsAccumulator(3, 16)
    everything.update(LatentBatch(batch.topk, None))
    assert torch.equal(accumulator.counts + other.counts, everything.counts)


def test_streaming_equals_one_batch():
    generator = torch.Generator().manual_seed(1)
    batches = [random_latents(2, 2, 8, 32, 4, generator) for _ in range(3)]
    streamed = DistsAccumulator(2, 32)
    for batch in batches:
        streamed.update(batch)
    joined = LatentBatch(
        TopK(
            torch.cat([batch.topk.values for batch in batches], dim=1),
            torch.cat([batch.topk.indices for batch in batches], dim=1),
        ),
        None,
    )
    at_once = DistsAccumulator(2, 32)
    at_once.update(joined)
    assert torch.equal(streamed.counts, at_once.counts)
    torch.testing.assert_close(streamed.totals, at_once.totals)
    assert streamed.tokens == at_once.tokens == 3 * 16


def test_collect_dists_logs_every_n_steps():
    generator = torch.Generator().manual_seed(2)
    batches = [random_latents(2, 1, 4, 8, 2, generator) for _ in range(5)]
    source = ScriptedSource(2, 8, batches)
    tokens = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}] * 5
    dists, rows = collect_dists(source, tokens, log_every_n_steps=2)
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert [row["tokens"] for row in rows] == [4, 12, 20]
    assert dists.counts.sum() == 5 * 4 * 2 * 2


def test_dataset_and_file_round_trips(tmp_path):
    generator = torch.Generator().manual_seed(3)
    accumulator = DistsAccumulator(3, 10)
    accumulator.update(random_latents(3, 2, 4, 10, 3, generator))
    dists = accumulator.dists()

    dists.save(tmp_path / "dists.safetensors")
    from_file = Dists.load(tmp_path / "dists.safetensors")
    assert torch.equal(from_file.counts, dists.counts)
    assert torch.equal(from_file.totals, dists.totals)

    dataset = dists.to_dataset()
    assert dataset.column_names == list(next(iter(dists)))
    # Rows in any order give the same tensors.
    dataset.shuffle(seed=0).to_json(tmp_path / "rows.jsonl")
    dataset.save_to_disk(tmp_path / "saved")
    for loaded in (Dists.load(tmp_path / "rows.jsonl"), Dists.load(tmp_path / "saved")):
        assert torch.equal(loaded.counts, dists.counts)
        assert torch.equal(loaded.totals, dists.totals)

    golden_rows = datasets.load_dataset(
        "json", data_files=str(GOLDENS / "dists_rows.jsonl"), split="train"
    )
    from_golden_rows = Dists.from_dataset(golden_rows)
    golden = load_file(GOLDENS / "dists.safetensors")
    assert torch.equal(from_golden_rows.counts, golden["counts"])
    assert torch.equal(from_golden_rows.totals, golden["totals"])


def test_command_processes_exactly_max_tokens_and_caches(tmp_path, capsys):
    dists = main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--path={CORPUS}",
            "--max_length=32",
            "--batch_size=2",
            f"--max_tokens={2 * TOKENS_PER_BATCH + 10}",
            "--count_special_tokens=true",
            "--log_every_n_steps=1",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    assert dists.counts.sum() == 2 * TOKENS_PER_BATCH * 4 * 6
    cached = tmp_path / "mlsae-tfm-trained-dists.safetensors"
    assert cached.exists()
    loaded = Dists.load(str(GOLDEN_MODEL), output_dir=tmp_path)
    assert torch.equal(loaded.counts, dists.counts)
    (layer_std_csv,) = tmp_path.glob("*.csv")
    with open(layer_std_csv) as file:
        assert [row["tokens"] for row in csv.DictReader(file)] == ["64", "128"]

    # By default the zeroed special-token positions do not count.
    without_special = main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--path={CORPUS}",
            "--max_length=32",
            "--batch_size=2",
            f"--max_tokens={TOKENS_PER_BATCH}",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    source = golden_source()
    (batch,) = get_test_dataloader(source.tokenizer, 32, 2, path=str(CORPUS), max_tokens=64)
    n_special = int((batch["input_ids"] == source.tokenizer.eos_token_id).sum())
    assert n_special > 0
    assert without_special.counts.sum() == (TOKENS_PER_BATCH - n_special) * 4 * 6


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--repo_id",
        "--model_name",
        "--expansion_factor",
        "-k",
        "--tuned_lens",
        "--path",
        "--max_tokens",
        "--count_special_tokens",
        "--output_dir",
        "--push_to_hub",
        "--device",
        "--log_every_n_steps",
    ):
        assert option in help_text
    assert "data/test.jsonl.zst" in "".join(help_text.split())
