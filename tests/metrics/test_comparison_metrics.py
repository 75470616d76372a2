"""The metrics that compare with SAELens and SAEBench, against the formulas written out by
hand in numpy over every position of every batch."""

import numpy as np
import pytest
import torch

from mlsae.metrics import (
    DENSE_DENSITY,
    LayerwiseDenseLatents,
    LayerwiseExplainedVariance,
    LayerwiseExplainedVarianceLegacy,
    LayerwiseLatentDensity,
    LayerwiseLossRecovered,
    LayerwiseNeverFired,
    count_predictions,
)
from mlsae.metrics.spliced import next_token_loss


def batches(offset: float = 0.0, seed: int = 0):
    """Three batches `[layer 2, batch, pos 5, d 4]` of different sizes, with masks."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for batch in (1, 3, 2):
        inputs = torch.randn(2, batch, 5, 4, generator=generator) + offset
        recons = inputs + 0.5 * torch.randn(2, batch, 5, 4, generator=generator)
        mask = torch.rand(batch, 5, generator=generator) > 0.3
        mask[0, 0] = True
        found.append((inputs, recons, mask))
    return found


def counted_vectors(found, layer):
    inputs = np.concatenate([x[layer][m].double().numpy() for x, _, m in found])
    recons = np.concatenate([r[layer][m].double().numpy() for _, r, m in found])
    return inputs, recons


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_explained_variance_is_saelens_over_the_whole_evaluation(offset):
    found = batches(offset)
    metric = LayerwiseExplainedVariance(2, 4)
    for inputs, recons, mask in found:
        metric.update(inputs=inputs, recons=recons, mask=mask)
    for layer in range(2):
        x, x_hat = counted_vectors(found, layer)
        expected = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
        assert metric.compute()[layer].item() == pytest.approx(expected, rel=1e-4)


def test_explained_variance_without_a_mask_counts_every_position():
    inputs, recons, _ = batches()[1]
    result = LayerwiseExplainedVariance(2, 4)(inputs=inputs, recons=recons)
    x = inputs[0].reshape(-1, 4).double().numpy()
    x_hat = recons[0].reshape(-1, 4).double().numpy()
    expected = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert result[0].item() == pytest.approx(expected, rel=1e-5)
    exact = LayerwiseExplainedVariance(2, 4)(inputs=inputs, recons=inputs)
    torch.testing.assert_close(exact, torch.ones(2))


def test_legacy_explained_variance_is_the_mean_over_positions_of_each_ratio():
    found = batches()
    metric = LayerwiseExplainedVarianceLegacy(2)
    for inputs, recons, mask in found:
        metric.update(inputs=inputs, recons=recons, mask=mask)
    for layer in range(2):
        ratios = []
        for inputs, recons, mask in found:
            x, x_hat = inputs[layer][mask].double().numpy(), recons[layer][mask].double().numpy()
            spread = ((x - x.mean(axis=0)) ** 2).sum(axis=1)
            ratios.extend(1 - ((x - x_hat) ** 2).sum(axis=1) / spread)
        assert metric.compute()[layer].item() == pytest.approx(np.mean(ratios), rel=1e-4)


def test_density_counts_firings_at_the_positions_that_count():
    # 2 layers, 1 batch, 3 positions, k 2; 6 latents; position 2 does not count.
    values = torch.tensor(
        [[[[1.0, 0.0], [2.0, 0.5], [3.0, 3.0]]], [[[0.2, 0.1], [0.3, 0.0], [1.0, 1.0]]]]
    )
    indices = torch.tensor([[[[0, 1], [0, 2], [3, 4]]], [[[5, 4], [5, 1], [0, 2]]]])
    mask = torch.tensor([[True, True, False]])
    density = LayerwiseLatentDensity(2, 6)(values=values, indices=indices, mask=mask)
    expected = torch.zeros(2, 6)
    expected[0, 0], expected[0, 2] = 1.0, 0.5  # latent 1 was selected with 0: not fired
    expected[1, 5], expected[1, 4] = 1.0, 0.5
    torch.testing.assert_close(density, expected)
    never = LayerwiseNeverFired(2, 6)(values=values, indices=indices, mask=mask)
    torch.testing.assert_close(never, torch.tensor([4 / 6, 4 / 6]))
    dense = LayerwiseDenseLatents(2, 6, threshold=0.5)(values=values, indices=indices, mask=mask)
    torch.testing.assert_close(dense, torch.tensor([1 / 6, 1 / 6]))


def test_density_accumulates_over_batches_like_saebench():
    generator = torch.Generator().manual_seed(1)
    n_latents, fired, positions = 40, np.zeros((2, 40)), 0
    dense, never = LayerwiseDenseLatents(2, n_latents), LayerwiseNeverFired(2, n_latents)
    for batch in (2, 3):
        values = torch.rand(2, batch, 7, 3, generator=generator) - 0.2
        indices = torch.stack(
            [torch.randperm(n_latents, generator=generator)[:3] for _ in range(2 * batch * 7)]
        ).view(2, batch, 7, 3)
        mask = torch.rand(batch, 7, generator=generator) > 0.2
        for metric in (dense, never):
            metric.update(values=values, indices=indices, mask=mask)
        acts = np.zeros((2, batch, 7, n_latents))
        np.put_along_axis(acts, indices.numpy(), values.numpy(), axis=-1)
        fired += ((acts > 0) * mask.numpy()[None, :, :, None]).sum(axis=(1, 2))
        positions += int(mask.sum())
    density = fired / positions
    np.testing.assert_allclose(dense.compute().numpy(), (density > DENSE_DENSITY).mean(-1))
    np.testing.assert_allclose(never.compute().numpy(), (density == 0).mean(-1))


def test_loss_recovered_is_the_ratio_of_the_means_over_every_prediction():
    metric = LayerwiseLossRecovered(2, "zero")
    rows = [  # (true, pred, zero-ablated per layer, predictions)
        ([2.0, 2.5], [2.2, 2.6], [5.0, 3.5], 10.0),
        ([3.0, 2.0], [3.5, 2.0], [6.0, 4.0], 30.0),
    ]
    for true, pred, zero, n in rows:
        metric.update(
            loss_true=torch.tensor(true),
            loss_pred=torch.tensor(pred),
            loss_zero=torch.tensor(zero),
            loss_mean=torch.tensor([99.0, 99.0]),
            n_predictions=torch.tensor(n),
        )
    weights = np.array([n for *_, n in rows])
    true, pred, zero = (
        np.average([row[i] for row in rows], axis=0, weights=weights) for i in range(3)
    )
    np.testing.assert_allclose(metric.compute().numpy(), (zero - pred) / (zero - true), rtol=1e-6)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_loss_recovered_is_one_when_exact_and_zero_when_as_bad_as_the_ablation(ablation):
    true, ablated = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 7.0])
    losses = {"loss_zero": ablated, "loss_mean": ablated, "n_predictions": torch.tensor(8.0)}
    exact = LayerwiseLossRecovered(2, ablation)(loss_true=true, loss_pred=true, **losses)
    torch.testing.assert_close(exact, torch.ones(2))
    none = LayerwiseLossRecovered(2, ablation)(loss_true=true, loss_pred=ablated, **losses)
    torch.testing.assert_close(none, torch.zeros(2))
    with pytest.raises(ValueError, match="ablation"):
        LayerwiseLossRecovered(2, "random")  # type: ignore[arg-type]


def test_count_predictions_is_what_next_token_loss_averages_over():
    tokens = torch.randint(0, 10, (3, 6))
    mask = torch.rand(3, 6) > 0.4
    mask[0, 0] = True
    assert count_predictions(tokens).item() == 15
    assert count_predictions(tokens, mask).item() == mask[:, :-1].sum()
    logits = torch.randn(3, 6, 10)
    per_prediction = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    )
    summed = (per_prediction * mask[:, :-1].flatten()).sum()
    total = next_token_loss(logits, tokens, mask) * count_predictions(tokens, mask)
    assert total.item() == pytest.approx(summed.item(), rel=1e-5)
