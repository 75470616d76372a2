"""A stack of per-layer SAEs as a `LatentSource` (`StackSource`): the analyses' commands run
end to end on SAELens SAEs over every block of the golden GPT-NeoX and of a tiny Llama,
checked against the SAEs' formulas applied by hand to the blocks' outputs."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlsae.analysis import dists, examples, heatmaps, variances
from mlsae.analysis.dists import DistsAccumulator
from mlsae.analysis.source import LatentBatch, padded_latents
from mlsae.cli import DataConfig, run_command
from mlsae.lm.data import held_out_stream
from mlsae.saes.base import SparseLatents
from mlsae.types import TopK
from tests.analysis import CORPUS, golden_tokenizer
from tests.saes.stack_files import (
    GPT_NEOX,
    block_outputs,
    encode_by_hand,
    write_saelens,
    write_stack,
    write_tiny_llama,
)

BATCHES = 3
DATA = ["--path", str(CORPUS), "--max_length", "32", "--batch_size", "2", "--device", "cpu",
        "--max_tokens", str(BATCHES * 64)]  # fmt: skip


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("neox-saes")
    return root, write_stack(root, [0, 1, 2, 3], 48, [64, 96, 48, 80])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("llama")
    model = write_tiny_llama(root / "model")
    return root, model, write_stack(root / "saes", [0, 1, 2], 32, [40, 24, 40])


def expected_dists(model_folder: Path, saes: list[dict], count_special: bool):
    """Per layer and latent, how often that layer's SAE fired it and the sum of its
    activations, over the positions that count; and how many positions counted."""
    n_latents = max(tensors["W_enc"].shape[1] for tensors in saes)
    counts = torch.zeros(len(saes), n_latents)
    totals = torch.zeros(len(saes), n_latents)
    data = DataConfig(
        path=str(CORPUS), split="test", max_length=32, batch_size=2, max_tokens=BATCHES * 64
    )
    tokens_counted = 0
    for batch in held_out_stream(data, golden_tokenizer()):
        tokens = batch["input_ids"]
        counted = torch.ones_like(tokens, dtype=torch.bool) if count_special else tokens != 0
        tokens_counted += int(counted.sum())
        for layer, (x, tensors) in enumerate(
            zip(block_outputs(model_folder, tokens)[0], saes, strict=True)
        ):
            acts = encode_by_hand(tensors, x.reshape(-1, x.shape[-1]))[counted.flatten()]
            d_sae = acts.shape[-1]
            counts[layer, :d_sae] += (acts > 0).sum(0)
            totals[layer, :d_sae] += acts.sum(0)
    return counts, totals, tokens_counted


def test_dists_of_a_gpt_neox_stack_are_each_saes_own_firing_counts(neox, tmp_path, capsys):
    root, saes = neox
    pattern = str(root / "layer_{layer}")
    args = ["--model_name", str(GPT_NEOX), "--sae", pattern, "--output_dir", str(tmp_path)]
    result = dists.main([*args, *DATA])
    counts, totals, tokens = expected_dists(GPT_NEOX, saes, count_special=False)
    assert (result.n_layers, result.n_latents, result.tokens) == (4, 96, tokens)
    assert torch.equal(result.counts, counts)
    assert (counts.sum(1) > 0).all() and counts[2, 48:].sum() == 0  # d_sae 48 of 96
    torch.testing.assert_close(result.totals, totals, rtol=1e-5, atol=1e-4)

    path = tmp_path / f"{root.name}-layer_L-stack-dists.safetensors"
    assert f"Saved the dists of {pattern} to {path}" in capsys.readouterr().out
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    assert metadata["mlsae.repo_id"] == pattern and len(metadata["mlsae.model"]) == 64


def test_a_stack_of_the_same_name_replaces_the_output_saying_so(tmp_path, capsys):
    # Both are named saes-layer_L-stack; their identities tell them apart.
    printed = []
    for run, seed in (("a", 0), ("a", 0), ("b", 1)):
        write_saelens(tmp_path / run / "saes" / "layer_1", 1, 48, 16, seed=seed)
        pattern = str(tmp_path / run / "saes" / "layer_{layer}")
        dists.main(
            ["--model_name", str(GPT_NEOX), "--sae", pattern, "--output_dir", str(tmp_path),
             *DATA[:-1], "64"]
        )  # fmt: skip
        printed.append(capsys.readouterr().out)
    path = tmp_path / "saes-layer_L-stack-dists.safetensors"
    assert "Replaced" not in printed[1]
    assert f"Replaced {path}, an output of another model" in printed[2]


def test_dists_of_a_llama_stack_count_special_tokens_when_asked(llama, tmp_path):
    root, model, saes = llama
    result = dists.main(
        ["--model_name", str(model), "--sae", str(root / "saes" / "layer_{layer}"),
         "--layers", "0", "1", "2", "--count_special_tokens", "true",
         "--output_dir", str(tmp_path), *DATA]
    )  # fmt: skip
    counts, totals, tokens = expected_dists(model, saes, count_special=True)
    assert tokens == BATCHES * 64 and result.tokens == tokens
    assert torch.equal(result.counts, counts)
    torch.testing.assert_close(result.totals, totals, rtol=1e-5, atol=1e-4)


def test_examples_of_a_stack_are_each_saes_top_activations(neox, tmp_path):
    root, _ = neox
    top = examples.main(
        ["--model_name", str(GPT_NEOX), "--sae", str(root / "layer_{layer}"),
         "--output_dir", str(tmp_path), "--n_examples", "2", *DATA[:-1], "64"]
    )  # fmt: skip
    assert top.path.name == f"{root.name}-layer_L-stack-examples.db"
    assert top.shape() == (4, 96)
    assert top.get(2, 60) == []  # beyond the width of layer 2's SAE
    rows = top.get(1, 1) + top.get(1, 2) + top.get(1, 3)
    assert rows and all(row.layer == 1 and row.act > 0 for row in rows)


def test_padding_never_counts_as_firing():
    # Two vectors at one layer: latents [3, 5] and none; at another: latent [0] and [1].
    sparse = [
        SparseLatents(torch.tensor([2.0, 1.0]), torch.tensor([3, 5]), torch.tensor([0, 2, 2]),
                      (1, 2, 8)),
        SparseLatents(torch.tensor([4.0, 0.5]), torch.tensor([0, 1]), torch.tensor([0, 1, 2]),
                      (1, 2, 6)),
    ]  # fmt: skip
    topk, selected = padded_latents(sparse)
    assert topk.values.shape == (2, 1, 2, 2)
    assert topk.values[0, 0].tolist() == [[2.0, 1.0], [0.0, 0.0]]
    assert topk.indices[1, 0].tolist() == [[0, 0], [1, 0]]
    assert selected[:, 0].tolist() == [[[True, True], [False, False]], [[True, False]] * 2]
    accumulator = DistsAccumulator(2, 8)
    accumulator.update(LatentBatch(TopK(*topk), None, selected))
    result = accumulator.dists()
    assert result.counts[0].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert result.counts[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert result.totals[1, :2].tolist() == [4.0, 0.5]


def error_line(capsys, main, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(args))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in lines, lines
    return errors[0]


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (dists, ["--sae", "x_{layer}"], "--sae needs --model_name"),
        (dists, ["--sae", "x", "--repo_id", "y", "--model_name", "m"], "pass one of them"),
        (dists, ["--layers", "0", "1"], "--layers expands a --sae pattern"),
        (dists, ["--sae", "x", "--model_name", "m", "--push_to_hub", "true"], "not published"),
        (heatmaps, ["--sae", "x", "--model_name", "m"], "--sae: heatmaps follows each latent"),
        (variances, ["--sae", "x", "--model_name", "m"], "--sae: variances compares"),
    ],
)
def test_options_that_cannot_go_together_are_one_line(capsys, module, args, message):
    assert message in error_line(capsys, module.main, args)


def test_saes_of_another_model_are_one_line(capsys, llama, monkeypatch):
    root, _, _ = llama
    monkeypatch.chdir(root)
    line = error_line(
        capsys, dists.main, ["--sae", "saes/layer_{layer}", "--model_name", str(GPT_NEOX), *DATA]
    )
    assert "saes/layer_0 encodes vectors of width 32, but resid_post of block 0" in line
    line = error_line(capsys, dists.main, ["--sae", "nothing_{layer}", "--model_name", "m"])
    assert "no local file or folder matches nothing_{layer}" in line
