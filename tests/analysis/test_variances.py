import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae.analysis.source import LatentBatch, MLSAESource, load_source
from mlsae.analysis.variances import (
    LATENT_COLUMNS,
    VariancesAccumulator,
    collect_variances,
    main,
    write_csv,
)
from mlsae.analysis.variances_original import (
    ORIGINAL_COLUMNS,
    STATISTICS,
    OriginalVariancesAccumulator,
    collect_original_variances,
    original_model_columns,
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
from tests.goldens import GOLDENS


def dense_weights(batch: LatentBatch, n_latents: int, relu: bool = True) -> np.ndarray:
    """`[layer, token, latent]` top-k values (after ReLU unless not `relu`) at the counted
    positions."""
    values, indices = batch.topk
    n_layers, n_batch, n_pos, _ = indices.shape
    dense = np.zeros((n_layers, n_batch, n_pos, n_latents))
    for index in np.ndindex(*indices.shape):
        value = float(values[index])
        dense[(*index[:3], int(indices[index]))] = max(value, 0.0) if relu else value
    mask = np.ones((n_batch, n_pos), bool) if batch.mask is None else batch.mask.numpy()
    return dense[:, mask]


def variance_over_layers(weights: np.ndarray) -> float:
    layers = np.arange(len(weights))
    probs = weights / weights.sum()
    mean = (probs * layers).sum()
    return float((probs * (layers - mean) ** 2).sum())


def direct(dense: np.ndarray) -> dict:
    """Every statistic of the default definition, pair by pair, from `[layer, token,
    latent]` weights."""
    _, n_tokens, n_latents = dense.shape
    token_variances = {}
    for token in range(n_tokens):
        for latent in range(n_latents):
            if dense[:, token, latent].sum() > 0:
                token_variances[token, latent] = variance_over_layers(dense[:, token, latent])
    per_latent = [
        [v for (_, other), v in token_variances.items() if other == latent]
        for latent in range(n_latents)
    ]
    per_token = [
        [v for (other, _), v in token_variances.items() if other == token]
        for token in range(n_tokens)
    ]
    aggregate = []
    for latent in range(n_latents):
        active = [token for (token, other) in token_variances if other == latent]
        if not active:
            aggregate.append(math.nan)
            continue
        distributions = [dense[:, t, latent] / dense[:, t, latent].sum() for t in active]
        aggregate.append(variance_over_layers(np.mean(distributions, axis=0)))
    counts = np.array([len(v) for v in per_latent])
    aggregate = np.array(aggregate)
    latent_token = np.array([np.mean(v) if v else math.nan for v in per_latent])
    mean_token = float(np.mean(list(token_variances.values())))
    # Each latent's aggregate once per active token: every active pair counts once.
    mean_aggregate = float(np.mean(np.repeat(np.nan_to_num(aggregate), counts)))
    return {
        "mean_token_variance": mean_token,
        "mean_aggregate_variance": mean_aggregate,
        "ratio": mean_aggregate / mean_token,
        "mean_latent_token_variance": float(np.nanmean(latent_token)),
        "mean_latent_aggregate_variance": float(np.nanmean(aggregate)),
        "latent_ratio": float(np.nanmean(aggregate) / np.nanmean(latent_token)),
        "aggregate_variance": aggregate,
        "latent_token_variance": latent_token,
        "active_tokens": counts,
        "token_variance": np.array([np.mean(v) if v else math.nan for v in per_token]),
        "n_active": np.array([len(v) for v in per_token]),
    }


HEADLINE = (
    "mean_token_variance",
    "mean_aggregate_variance",
    "ratio",
    "mean_latent_token_variance",
    "mean_latent_aggregate_variance",
    "latent_ratio",
)


def assert_matches(variances, expected: dict) -> None:
    for name in HEADLINE:
        assert getattr(variances, name) == pytest.approx(expected[name], rel=1e-9), name
    for name in ("aggregate_variance", "latent_token_variance", "token_variance"):
        np.testing.assert_allclose(
            getattr(variances, name).cpu().numpy(), expected[name], rtol=1e-9, atol=1e-12
        )
    np.testing.assert_array_equal(variances.active_tokens.numpy(), expected["active_tokens"])
    np.testing.assert_array_equal(variances.n_active.numpy(), expected["n_active"])


def one_batch(values: list[list[float]], indices: list[list[int]]) -> LatentBatch:
    """One sequence, one latent per vector: `values[layer][pos]` at `indices[layer][pos]`."""
    n_layers, n_pos = len(values), len(values[0])
    return LatentBatch(
        TopK(
            torch.tensor(values).view(n_layers, 1, n_pos, 1),
            torch.tensor(indices).view(n_layers, 1, n_pos, 1),
        ),
        None,
    )


def test_hand_made_example():
    # Four layers, one latent per vector, two tokens.
    # Token 0: latent 0 at layers 0 and 2 (value 1); latent 1 at layers 1 and 3 with a
    # negative value, so it is not active. Token 1: latent 2 at layers 0-2 (value 1),
    # latent 0 at layer 3 (value 4).
    batch = one_batch(
        [[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, 4.0]], [[0, 2], [1, 2], [0, 2], [1, 0]]
    )
    accumulator = VariancesAccumulator(4, 3)
    accumulator.update(batch, torch.tensor([[7, 8]]))
    variances = accumulator.compute()

    # Token variances: (0, 0) -> 1 (mean layer 1), (1, 2) -> 2/3, (1, 0) -> 0 (mean 3).
    assert variances.mean_token_variance == pytest.approx(5 / 9)
    # Latent 0 aggregated: the mean of (1/2, 0, 1/2, 0) and (0, 0, 0, 1), whatever the
    # values' sizes -> variance 1.5 = its mean token variance 1/2 + the variance 1 of its
    # mean layers 1 and 3; latent 2: 2/3.
    torch.testing.assert_close(
        variances.aggregate_variance,
        torch.tensor([1.5, math.nan, 2 / 3], dtype=torch.float64),
        equal_nan=True,
    )
    # Per active pair: latent 0 twice, latent 2 once.
    assert variances.mean_aggregate_variance == pytest.approx((2 * 1.5 + 2 / 3) / 3)
    assert variances.ratio == pytest.approx((11 / 9) / (5 / 9))
    # Per active latent.
    assert variances.mean_latent_token_variance == pytest.approx((0.5 + 2 / 3) / 2)
    assert variances.mean_latent_aggregate_variance == pytest.approx((1.5 + 2 / 3) / 2)
    assert variances.latent_ratio == pytest.approx((13 / 12) / (7 / 12))
    torch.testing.assert_close(
        variances.latent_token_variance,
        torch.tensor([0.5, math.nan, 2 / 3], dtype=torch.float64),
        equal_nan=True,
    )
    assert variances.active_tokens.tolist() == [2, 0, 1]
    assert variances.token_ids.tolist() == [7, 8]
    torch.testing.assert_close(variances.token_variance, torch.tensor([1.0, 1 / 3]).double())
    assert variances.n_active.tolist() == [1, 2]


def test_zero_token_variance_gives_an_infinite_ratio_not_an_error(tmp_path):
    # Every active latent sits at one layer on every token: latent 0 at layer 0 on token
    # 0 and at layer 1 on token 1; latent 1 at layer 1 on both.
    batch = one_batch([[1.0, -1.0], [2.0, 3.0]], [[0, 1], [1, 0]])
    accumulator = VariancesAccumulator(2, 2)
    accumulator.update(batch)
    variances = accumulator.compute()
    assert variances.mean_token_variance == 0
    # Latent 0: the mean of (1, 0) and (0, 1) -> variance 1/4; latent 1: 0.
    assert variances.mean_aggregate_variance == pytest.approx((2 * 0.25 + 1 * 0) / 3)
    assert variances.ratio == math.inf
    assert variances.latent_ratio == math.inf
    summary = variances.summary()
    assert summary["ratio"] == math.inf
    write_csv([summary], tmp_path / "summary.csv")

    # Both sides 0 (latent 1 only, always at layer 1): the ratio is undefined.
    still = VariancesAccumulator(2, 2)
    still.update(one_batch([[-1.0, -1.0], [2.0, 3.0]], [[0, 0], [1, 1]]))
    assert math.isnan(still.compute().ratio)
    assert math.isnan(still.compute().latent_ratio)
    # No active latent at all.
    none = VariancesAccumulator(2, 2)
    none.update(one_batch([[-1.0], [-2.0]], [[0], [1]]))
    assert math.isnan(none.compute().summary()["ratio"])


def test_aggregate_is_never_below_the_token_variance():
    generator = torch.Generator().manual_seed(3)
    batch = random_latents(6, 4, 16, 20, 4, generator)
    accumulator = VariancesAccumulator(6, 20)
    accumulator.update(batch)
    variances = accumulator.compute()
    active = variances.active_tokens > 0
    excess = variances.aggregate_variance - variances.latent_token_variance
    assert (excess[active] >= -1e-12).all()
    assert variances.ratio >= 1 and variances.latent_ratio >= 1


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


# The original definition ---------------------------------------------------------------


def original_direct(batches: list[np.ndarray]) -> dict[str, float]:
    """The original's statistics, formula by formula, from each batch's `[layer, token,
    latent]` values before ReLU, averaged over batches."""

    def var(x: np.ndarray) -> np.ndarray:
        layers = np.arange(len(x)).reshape(-1, *([1] * (x.ndim - 1)))
        return (layers**2 * x).sum(0) - (layers * x).sum(0) ** 2

    per_batch = []
    for values in batches:
        with np.errstate(invalid="ignore"):
            probs = np.nan_to_num(values / values.sum(0), nan=0.0)
        exp_var_l_f = var(probs.mean(1)).mean()
        exp_var_l_tf = var(probs).mean()
        var_l = var(probs.mean((1, 2)))
        per_batch.append(
            [exp_var_l_f, exp_var_l_tf, var_l, exp_var_l_f / var_l, exp_var_l_tf / exp_var_l_f]
        )
    return dict(zip(STATISTICS, np.mean(per_batch, axis=0), strict=True))


def test_original_matches_direct_computation_with_masks():
    generator = torch.Generator().manual_seed(1)
    n_layers, n_latents, k = 4, 10, 3
    masks = [torch.rand(2, 6, generator=generator) > 0.3, None, None]
    batches = [random_latents(n_layers, 2, 6, n_latents, k, generator, mask) for mask in masks]
    # Some values are negative, as before ReLU; one latent whose values sum to 0 on a
    # token (0 / 0 counts as 0, as in the original).
    values, indices = batches[2].topk
    values[:, 0, 0], indices[:, 0, 0] = 0.0, torch.tensor([0, 1, 2]).expand(n_layers, 3)
    assert (torch.cat([batch.topk.values.flatten() for batch in batches]) < 0).any()
    source = ScriptedSource(n_layers, n_latents, batches)

    variances = collect_original_variances(source, [{"input_ids": torch.zeros(2, 6)}] * 3)

    expected = original_direct([dense_weights(batch, n_latents, relu=False) for batch in batches])
    for name in STATISTICS:
        assert getattr(variances, name) == pytest.approx(expected[name], rel=1e-9), name
    assert variances.batches == 3
    assert variances.tokens == int(masks[0].sum()) + 2 * 12
    assert variances.row({"model_name": "m"})["step"] == 2
    assert variances.aggregate_over_token == pytest.approx(1 / expected["rel_var_t"])


def test_original_with_zero_token_variance_gives_an_infinite_ratio_not_an_error(tmp_path):
    # As in the default definition's test: every latent at one layer on every token (the
    # negative value counts before ReLU, as a distribution of one entry).
    batch = one_batch([[1.0, -1.0], [2.0, 3.0]], [[0, 1], [1, 0]])
    accumulator = OriginalVariancesAccumulator(2, 2)
    accumulator.update(batch)
    variances = accumulator.compute()

    expected = original_direct([dense_weights(batch, 2, relu=False)])
    assert variances.exp_var_l_tf == expected["exp_var_l_tf"] == 0
    # Both latents: q = (1/2, 1/2), so 1/2 - 1/4.
    assert variances.exp_var_l_f == pytest.approx(expected["exp_var_l_f"]) == 0.25
    assert variances.rel_var_t == 0
    assert variances.aggregate_over_token == math.inf
    write_csv([variances.row({"model_name": "m"})], tmp_path / "original.csv")

    # Both sides 0 (latent 0 always at layer 0, latent 1 always at layer 1, so q is one
    # layer too): the ratios are undefined.
    still = OriginalVariancesAccumulator(2, 2)
    still.update(one_batch([[-1.0, -1.0], [2.0, 3.0]], [[0, 0], [1, 1]]))
    assert math.isnan(still.compute().rel_var_t)
    assert math.isnan(still.compute().aggregate_over_token)


def test_original_aggregate_counts_where_a_still_latent_is():
    # docs/variances.md's example: one latent of a 4-layer model, only at layer 3, on 1
    # token in 10 (value 0 elsewhere, so 0 / 0 there). Its distribution never spreads, yet
    # the original's unnormalised q = (0, 0, 0, 0.1) scores 9 x 0.1 - 0.3^2 = 0.81.
    values = torch.zeros(4, 1, 10, 1)
    values[3, 0, 0, 0] = 1.0
    batch = LatentBatch(TopK(values, torch.zeros(4, 1, 10, 1, dtype=torch.long)), None)
    original = OriginalVariancesAccumulator(4, 1)
    original.update(batch)
    assert original.compute().exp_var_l_f == pytest.approx(0.81)
    assert original.compute().exp_var_l_tf == 0

    consistent = VariancesAccumulator(4, 1)
    consistent.update(batch)
    variances = consistent.compute()
    assert variances.mean_aggregate_variance == variances.mean_token_variance == 0


class WholeStreamSource:
    """The latents of the whole stream from one forward pass, served one batch at a
    time, so that the statistics are still per batch (one pass keeps the test short)."""

    def __init__(self, source: MLSAESource, batches: list[dict[str, torch.Tensor]]) -> None:
        self.n_layers, self.n_latents = source.n_layers, source.n_latents
        tokens = torch.cat([batch["input_ids"] for batch in batches])
        everything = source.latents(tokens)
        assert everything.mask is None
        self.rows = [len(batch["input_ids"]) for batch in batches]
        self.values = everything.topk.values.split(self.rows, dim=1)
        self.indices = everything.topk.indices.split(self.rows, dim=1)
        self.served = 0

    def latents(self, tokens: torch.Tensor) -> LatentBatch:
        index, self.served = self.served, self.served + 1
        return LatentBatch(TopK(self.values[index], self.indices[index]), None)


def test_original_reproduces_the_original_csv(monkeypatch):
    # As the original ran: from the goldens' folder, where the checkpoint's model_name
    # "tiny-gpt-neox-2" resolves.
    monkeypatch.chdir(GOLDENS)
    source = load_source("mlsae-tfm-trained", "cpu", count_special_tokens=True)
    batches = list(get_test_dataloader(source.tokenizer, 32, 2, path="corpus.jsonl.zst"))
    assert len(batches) == 1605

    variances = collect_original_variances(WholeStreamSource(source, batches), batches)

    row = variances.row(original_model_columns(source.model))
    with open(GOLDENS / "variances_original.csv") as file:
        (golden,) = list(csv.DictReader(file))
    assert list(row) == list(golden) == list(ORIGINAL_COLUMNS)
    assert row["model_name"] == golden["model_name"] == "tiny-gpt-neox-2"
    for name in ("n_layers", "n_latents", "expansion_factor", "k", "step", "tokens"):
        assert row[name] == int(golden[name]), name
    # The original summed in float32, this in float64.
    for name in STATISTICS:
        assert row[name] == pytest.approx(float(golden[name]), rel=1e-6), name


def test_command_writes_the_original_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(GOLDENS)
    source = load_source("mlsae-tfm-trained", "cpu", count_special_tokens=True)
    batches = list(
        get_test_dataloader(
            source.tokenizer, 32, 2, path="corpus.jsonl.zst", max_tokens=3 * TOKENS_PER_BATCH
        )
    )
    args = [
        "--repo_id=mlsae-tfm-trained",
        "--path=corpus.jsonl.zst",
        "--max_length=32",
        "--batch_size=2",
        f"--max_tokens={3 * TOKENS_PER_BATCH}",
        "--device=cpu",
        f"--output_dir={tmp_path}",
        "--definition=original",
        "--count_special_tokens=true",
    ]
    variances = main(args)

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "mlsae-tfm-trained-variances-original.csv"
    ]
    with open(tmp_path / "mlsae-tfm-trained-variances-original.csv") as file:
        (row,) = list(csv.DictReader(file))
    assert list(row) == list(ORIGINAL_COLUMNS)
    assert row["model_name"] == "tiny-gpt-neox-2"
    assert [row[name] for name in ("n_layers", "n_latents", "expansion_factor", "k")] == [
        "4",
        "384",
        "8",
        "6",
    ]
    assert (row["step"], row["tokens"]) == ("2", str(3 * TOKENS_PER_BATCH))
    expected = original_direct(
        [
            dense_weights(source.latents(batch["input_ids"]), source.n_latents, relu=False)
            for batch in batches
        ]
    )
    for name in STATISTICS:
        assert float(row[name]) == pytest.approx(expected[name], rel=1e-6), name
        assert getattr(variances, name) == pytest.approx(float(row[name])), name

    # Without --count_special_tokens, the special tokens are left out of every batch.
    without = main([arg for arg in args if not arg.startswith("--count_special")])
    tokens = torch.cat([batch["input_ids"] for batch in batches])
    assert without.tokens == int((tokens != source.tokenizer.eos_token_id).sum())
    assert without.exp_var_l_tf != pytest.approx(variances.exp_var_l_tf)
