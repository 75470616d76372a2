import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae.analysis.source import LatentBatch
from mlsae.analysis.variances import (
    LATENT_COLUMNS,
    VariancesAccumulator,
    collect_variances,
    main,
)
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


def dense_weights(batch: LatentBatch, n_latents: int) -> np.ndarray:
    """`[layer, token, latent]` top-k values after ReLU at the counted positions."""
    values, indices = batch.topk
    n_layers, n_batch, n_pos, _ = indices.shape
    dense = np.zeros((n_layers, n_batch, n_pos, n_latents))
    for index in np.ndindex(*indices.shape):
        dense[(*index[:3], int(indices[index]))] = max(float(values[index]), 0.0)
    mask = np.ones((n_batch, n_pos), bool) if batch.mask is None else batch.mask.numpy()
    return dense[:, mask]


def variance_over_layers(weights: np.ndarray) -> float:
    layers = np.arange(len(weights))
    probs = weights / weights.sum()
    mean = (probs * layers).sum()
    return float((probs * (layers - mean) ** 2).sum())


def direct(dense: np.ndarray) -> dict:
    """Every statistic, pair by pair, from `[layer, token, latent]` weights."""
    _, n_tokens, n_latents = dense.shape
    token_variances = {}
    for token in range(n_tokens):
        for latent in range(n_latents):
            if dense[:, token, latent].sum() > 0:
                token_variances[token, latent] = variance_over_layers(dense[:, token, latent])
    totals = dense.sum(1)
    aggregate = [
        variance_over_layers(totals[:, latent]) if totals[:, latent].sum() > 0 else math.nan
        for latent in range(n_latents)
    ]
    per_latent = [
        [v for (_, other), v in token_variances.items() if other == latent]
        for latent in range(n_latents)
    ]
    per_token = [
        [v for (other, _), v in token_variances.items() if other == token]
        for token in range(n_tokens)
    ]
    mean_token = float(np.mean(list(token_variances.values())))
    mean_aggregate = float(np.nanmean(aggregate))
    return {
        "mean_token_variance": mean_token,
        "mean_aggregate_variance": mean_aggregate,
        "ratio": mean_aggregate / mean_token,
        "aggregate_variance": np.array(aggregate),
        "latent_token_variance": np.array([np.mean(v) if v else math.nan for v in per_latent]),
        "active_tokens": np.array([len(v) for v in per_latent]),
        "token_variance": np.array([np.mean(v) if v else math.nan for v in per_token]),
        "n_active": np.array([len(v) for v in per_token]),
    }


def assert_matches(variances, expected: dict) -> None:
    for name in ("mean_token_variance", "mean_aggregate_variance", "ratio"):
        assert getattr(variances, name) == pytest.approx(expected[name], rel=1e-9), name
    for name in ("aggregate_variance", "latent_token_variance", "token_variance"):
        np.testing.assert_allclose(
            getattr(variances, name).cpu().numpy(), expected[name], rtol=1e-9, atol=1e-12
        )
    np.testing.assert_array_equal(variances.active_tokens.numpy(), expected["active_tokens"])
    np.testing.assert_array_equal(variances.n_active.numpy(), expected["n_active"])


def test_hand_made_example():
    # Four layers, one latent per vector, two tokens.
    # Token 0: latent 0 at layers 0 and 2 (value 1); latent 1 at layers 1 and 3 with a
    # negative value, so it is not active. Token 1: latent 2 at layers 0-2 (value 1),
    # latent 0 at layer 3 (value 2).
    indices = torch.tensor([[0, 2], [1, 2], [0, 2], [1, 0]]).view(4, 1, 2, 1)
    values = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]).view(4, 1, 2, 1)
    accumulator = VariancesAccumulator(4, 3)
    accumulator.update(LatentBatch(TopK(values, indices), None), torch.tensor([[7, 8]]))
    variances = accumulator.compute()

    # Token variances: (0, 0) -> 1, (1, 2) -> 2/3, (1, 0) -> 0.
    assert variances.mean_token_variance == pytest.approx(5 / 9)
    # Latent 0 aggregated: weights (1, 0, 1, 2) -> variance 1.5; latent 2: 2/3.
    torch.testing.assert_close(
        variances.aggregate_variance,
        torch.tensor([1.5, math.nan, 2 / 3], dtype=torch.float64),
        equal_nan=True,
    )
    assert variances.mean_aggregate_variance == pytest.approx(13 / 12)
    assert variances.ratio == pytest.approx((13 / 12) / (5 / 9))
    torch.testing.assert_close(
        variances.latent_token_variance,
        torch.tensor([0.5, math.nan, 2 / 3], dtype=torch.float64),
        equal_nan=True,
    )
    assert variances.active_tokens.tolist() == [2, 0, 1]
    assert variances.token_ids.tolist() == [7, 8]
    torch.testing.assert_close(variances.token_variance, torch.tensor([1.0, 1 / 3]).double())
    assert variances.n_active.tolist() == [1, 2]


def test_streaming_matches_direct_computation_with_masks():
    generator = torch.Generator().manual_seed(0)
    n_layers, n_latents, k = 4, 12, 3
    masks = [torch.rand(2, 5, generator=generator) > 0.3, None]
    batches = [random_latents(n_layers, 2, 5, n_latents, k, generator, mask) for mask in masks]
    source = ScriptedSource(n_layers, n_latents, batches)
    token_batches = [{"input_ids": torch.arange(10).view(2, 5) + 10 * i} for i in range(2)]

    variances = collect_variances(source, token_batches)

    dense = np.concatenate([dense_weights(batch, n_latents) for batch in batches], axis=1)
    assert variances.token_ids.tolist() == (
        torch.arange(10)[masks[0].flatten()].tolist() + list(range(10, 20))
    )
    assert_matches(variances, direct(dense))
    # Latents overlap across layers on the same token, so per-token variances are not 0.
    assert variances.mean_token_variance > 0


@pytest.fixture(scope="module")
def golden_batches():
    source = golden_source()
    batches = list(
        get_test_dataloader(
            source.tokenizer, 32, 2, path=str(CORPUS), max_tokens=2 * TOKENS_PER_BATCH
        )
    )
    return source, batches


def test_golden_model_matches_direct_computation(golden_batches):
    source, batches = golden_batches
    variances = collect_variances(source, batches)
    dense = np.concatenate(
        [dense_weights(source.latents(b["input_ids"]), source.n_latents) for b in batches], axis=1
    )
    assert dense.shape[1] == 2 * TOKENS_PER_BATCH
    assert_matches(variances, direct(dense))
    # The paper's finding, qualitatively, on a tiny model.
    assert variances.ratio > 1


def test_command_writes_the_outputs(tmp_path, golden_batches):
    source, batches = golden_batches
    args = [
        f"--repo_id={GOLDEN_MODEL}",
        f"--model_name={GOLDEN_TRANSFORMER}",
        f"--path={CORPUS}",
        "--max_length=32",
        "--batch_size=2",
        f"--max_tokens={2 * TOKENS_PER_BATCH + 5}",
        "--device=cpu",
        f"--output_dir={tmp_path}",
    ]
    variances = main(args)

    # Special tokens are left out by default.
    tokens = torch.cat([batch["input_ids"] for batch in batches])
    special = tokens == source.tokenizer.eos_token_id
    assert 0 < special.sum()
    assert variances.token_ids.tolist() == tokens[~special].tolist()

    with open(tmp_path / "mlsae-tfm-trained-variances.csv") as file:
        (summary,) = list(csv.DictReader(file))
    assert float(summary["ratio"]) == pytest.approx(variances.ratio)
    assert int(summary["tokens"]) == int((~special).sum())
    with open(tmp_path / "mlsae-tfm-trained-variances-latents.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(LATENT_COLUMNS)
    assert len(rows) == source.n_latents
    tensors = load_file(tmp_path / "mlsae-tfm-trained-variances-tokens.safetensors")
    assert torch.equal(tensors["token_ids"], variances.token_ids)
    torch.testing.assert_close(tensors["variance"], variances.token_variance, equal_nan=True)

    with_special = main([*args, "--count_special_tokens=true"])
    assert with_special.token_ids.tolist() == tokens.flatten().tolist()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--repo_id", "--model_name", "--expansion_factor", "-k", "--path"):
        assert option in help_text
    for option in ("--max_tokens", "--count_special_tokens", "--output_dir", "--device"):
        assert option in help_text
    assert "data/test.jsonl.zst" in "".join(help_text.split())
