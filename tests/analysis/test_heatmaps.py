import csv
import json
import math

import pytest
import torch

from mlsae.analysis.heatmaps import main, prompt_latents, tokenize_prompt
from mlsae.analysis.source import LatentBatch
from mlsae.model.types import TopK
from tests.analysis import GOLDEN_MODEL, GOLDEN_TRANSFORMER, ScriptedSource, golden_source

PROMPT = "When Mary and John went to the store, John gave a drink to"

OPTIONS = (
    "--repo_id",
    "--model_name",
    "--expansion_factor",
    "-k",
    "--prompt",
    "--threshold",
    "--count_special_tokens",
    "--output_dir",
    "--device",
)


def dense_activations(batch: LatentBatch, n_latents: int) -> torch.Tensor:
    """`[layer, pos, latent]` top-k values after ReLU of the first sequence, by loops."""
    values, indices = batch.topk
    dense = torch.zeros(*indices.shape[0:1], indices.shape[2], n_latents)
    for layer, position, slot in torch.cartesian_prod(
        *(torch.arange(n) for n in (indices.shape[0], indices.shape[2], indices.shape[3]))
    ).tolist():
        value = float(values[layer, 0, position, slot])
        dense[layer, position, int(indices[layer, 0, position, slot])] = max(value, 0.0)
    return dense


def check_against_dense(result, dense: torch.Tensor, counted: torch.Tensor, threshold: float):
    dense = dense * counted[None, :, None]
    expected_max = dense.max(-1).values
    for layer, position in torch.cartesian_prod(*(torch.arange(n) for n in dense.shape[:2])):
        actual = result.max_activation[layer, position]
        if counted[position]:
            assert actual == pytest.approx(float(expected_max[layer, position]))
        else:
            assert math.isnan(actual)

    firing = sorted({int(i) for i in (dense > threshold).nonzero()[:, 2]})
    assert sorted(result.latents.tolist()) == firing
    for row, latent in enumerate(result.latents.tolist()):
        torch.testing.assert_close(result.activations[row], dense[..., latent])
        expected = [
            (layer, position)
            for layer, position in (dense[..., latent] > threshold).nonzero().tolist()
        ]
        actual = [(f["layer"], f["position"]) for f in result.firings()[latent]]
        assert actual == expected
        for firing_row in result.firings()[latent]:
            assert firing_row["activation"] == pytest.approx(
                float(dense[firing_row["layer"], firing_row["position"], latent])
            )
            assert firing_row["token"] == result.tokens[firing_row["position"]]
    # Ascending mean layer.
    weights = dense[..., result.latents].sum(1)
    layer_mean = (weights * torch.arange(dense.shape[0])[:, None]).sum(0) / weights.sum(0)
    assert torch.all(layer_mean.diff() >= -1e-6)


def test_hand_made_latents_with_a_masked_position():
    source = ScriptedSource(3, 10, [])
    n_positions = len(source.tokenizer(PROMPT)["input_ids"])
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(1, n_positions, dtype=torch.bool)
    mask[0, 0] = False
    batch = LatentBatch(
        TopK(
            torch.randn(3, 1, n_positions, 2, generator=generator),
            torch.rand(3 * n_positions, 10, generator=generator)
            .argsort(-1)[:, :2]
            .view(3, 1, n_positions, 2),
        ),
        mask,
    )
    source._batches = iter([batch])
    result = prompt_latents(source, PROMPT, threshold=0.5)
    assert "".join(result.tokens) == PROMPT
    assert result.counted.tolist() == mask[0].tolist()
    assert result.blocks == [0, 1, 2]
    check_against_dense(result, dense_activations(batch, 10), mask[0], 0.5)
    # Values below the threshold of a firing latent are kept.
    assert ((result.activations > 0) & (result.activations <= 0.5)).any()


def test_golden_model_matches_direct_computation():
    source = golden_source()
    result = prompt_latents(source, PROMPT)
    tokens = torch.tensor(source.tokenizer(PROMPT)["input_ids"])
    assert torch.equal(result.token_ids, tokens)

    model = source.model
    inputs = model.transformer(tokens.unsqueeze(0))
    topk = model.autoencoder.encode(inputs).topk
    dense = dense_activations(LatentBatch(topk, None), source.n_latents)
    check_against_dense(result, dense, torch.ones(len(tokens), dtype=torch.bool), 1e-3)
    assert len(result.latents) > 0


def test_invalid_prompts_fail_clearly():
    source = golden_source()
    with pytest.raises(ValueError, match="empty"):
        prompt_latents(source, "")
    with pytest.raises(ValueError, match="context of 128"):
        prompt_latents(source, "a b " * 200)
    with pytest.raises(ValueError, match="context of 4"):
        tokenize_prompt(source, PROMPT, max_length=4)


def test_command_writes_json_and_csv(tmp_path):
    result = main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--prompt={PROMPT}",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    with open(tmp_path / "mlsae-tfm-trained-prompt.json") as file:
        saved = json.load(file)
    assert saved["tokens"] == result.tokens
    assert [entry["latent"] for entry in saved["latents"]] == result.latents.tolist()
    with open(tmp_path / "mlsae-tfm-trained-prompt-max.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == result.max_activation.numel()
    assert float(rows[0]["max_activation"]) == pytest.approx(float(result.max_activation[0, 0]))
    with open(tmp_path / "mlsae-tfm-trained-prompt-latents.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == sum(len(firings) for firings in result.firings().values())
    assert {int(row["latent"]) for row in rows} == set(result.latents.tolist())


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in help_text
