import csv
import dataclasses
import json
import math

import pytest
import torch

from mlsae.analysis.heatmaps import latents_of, main, prompt_latents
from mlsae.analysis.prompt import PromptError, analyse_prompt
from mlsae.analysis.source import LatentBatch, load_source
from mlsae.cli import run_command
from mlsae.model.types import TopK
from tests.analysis import GOLDEN_MODEL, GOLDEN_TRANSFORMER, golden_source

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
    model = golden_source().model
    analysis = analyse_prompt(model, PROMPT)
    n_layers, n_positions, k = analysis.values.shape
    generator = torch.Generator().manual_seed(1)
    counted = torch.ones(n_positions, dtype=torch.bool)
    counted[0] = False
    values = torch.randn(n_layers, n_positions, k, generator=generator).clamp(min=0)
    values = values * counted[None, :, None]
    indices = torch.rand(n_layers * n_positions, 10, generator=generator).argsort(-1)[:, :k]
    indices = indices.view(n_layers, n_positions, k)
    by_hand = dataclasses.replace(analysis, values=values, indices=indices, counted=counted)
    result = latents_of(by_hand, model, threshold=0.5)
    assert "".join(result.tokens) == PROMPT
    assert result.counted.tolist() == counted.tolist()
    assert result.blocks == list(range(n_layers))
    batch = LatentBatch(TopK(values[:, None], indices[:, None]), None)
    check_against_dense(result, dense_activations(batch, 10), counted, 0.5)
    # Values below the threshold of a firing latent are kept.
    assert ((result.activations > 0) & (result.activations <= 0.5)).any()


def test_golden_model_matches_direct_computation():
    model = golden_source().model
    result = prompt_latents(model, PROMPT)
    tokens = torch.tensor(model.transformer.tokenizer(PROMPT)["input_ids"])
    assert torch.equal(result.token_ids, tokens)

    inputs = model.transformer(tokens.unsqueeze(0))
    topk = model.autoencoder.encode(inputs).topk
    dense = dense_activations(LatentBatch(topk, None), model.n_latents)
    check_against_dense(result, dense, torch.ones(len(tokens), dtype=torch.bool), 1e-3)
    assert len(result.latents) > 0


def test_special_positions_are_left_out():
    model = load_source(str(GOLDEN_MODEL), "cpu", model_name=str(GOLDEN_TRANSFORMER)).model
    prompt = "<|endoftext|>" + PROMPT
    result = prompt_latents(model, prompt)
    tokens = torch.tensor([model.transformer.tokenizer(prompt)["input_ids"]])
    counted = tokens[0] != model.transformer.tokenizer.eos_token_id
    assert not counted[0] and counted[1:].all()
    assert result.counted.tolist() == counted.tolist()
    topk = model.autoencoder.encode(model.transformer(tokens)).topk
    dense = dense_activations(LatentBatch(topk, None), model.n_latents)
    check_against_dense(result, dense, counted, 1e-3)


@pytest.mark.parametrize("prompt", ["Return", "\n", "   "])
def test_a_one_token_prompt(prompt):
    model = golden_source().model
    assert len(model.transformer.tokenizer(prompt)["input_ids"]) == 1
    result = prompt_latents(model, prompt)
    assert result.max_activation.shape == (model.n_layers, 1)
    assert result.tokens == [prompt]


def test_invalid_prompts_fail_clearly():
    model = golden_source().model
    with pytest.raises(PromptError, match="empty"):
        prompt_latents(model, "")
    with pytest.raises(PromptError, match=r"has \d+ tokens, more than the 128 "):
        prompt_latents(model, "a b " * 200)
    with pytest.raises(PromptError, match="more than the 4"):
        prompt_latents(model, PROMPT, max_tokens=4)
    assert issubclass(PromptError, ValueError)  # a user error: one `error:` line, status 2


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


def test_a_prompt_too_long_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLSAE_TRACEBACK", raising=False)
    args = [
        f"--repo_id={GOLDEN_MODEL}",
        f"--model_name={GOLDEN_TRANSFORMER}",
        "--prompt=" + "a b " * 100,
        "--device=cpu",
        f"--output_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(args))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the prompt has 201 tokens, more than the 128 that fit the model's context: "
        "shorten it"
    ]
    assert not list(tmp_path.iterdir())


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in help_text
