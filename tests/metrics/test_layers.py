"""Statistics of a distribution over the stack's layers (`mlsae.metrics.layers`)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from mlsae.metrics import FIRING_THRESHOLD, LayerwiseL0Norm, layer_mean, layer_std, layer_variance
from mlsae.metrics.layers import layer_distribution


def reference(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the layer index over axis 0, one column at a time."""
    layers = np.arange(weights.shape[0])
    means, variances = [], []
    for column in weights.T:
        if column.sum() == 0:
            means.append(np.nan), variances.append(np.nan)
            continue
        probs = column / column.sum()
        mean = float(np.dot(probs, layers))
        means.append(mean)
        variances.append(float(np.dot(probs, (layers - mean) ** 2)))
    return np.array(means), np.array(variances)


@pytest.fixture
def weights() -> torch.Tensor:
    weights = torch.rand(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights[:, 3] = 0  # never fired
    weights[:, 4] = 0
    weights[2, 4] = 1.5  # one layer only
    return weights


def test_mean_and_variance_match_a_direct_computation(weights):
    means, variances = reference(weights.numpy())
    np.testing.assert_allclose(layer_mean(weights).numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(layer_variance(weights).numpy(), variances, rtol=1e-10)
    uncentred = layer_variance(weights, centred=False).numpy()
    np.testing.assert_allclose(uncentred, variances, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer_std(weights).numpy(), np.sqrt(variances), rtol=1e-10)
    assert layer_mean(weights)[4].item() == 2.0 and layer_variance(weights)[4].item() == 0.0
    assert layer_mean(weights)[3].isnan() and layer_variance(weights)[3].isnan()


def test_layers_along_another_dim(weights):
    batched = weights.T.reshape(4, 10, 6)  # [.., .., layer]
    means, variances = reference(weights.numpy())
    np.testing.assert_allclose(layer_mean(batched, dim=-1).flatten().numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(
        layer_variance(batched, dim=2).flatten().numpy(), variances, rtol=1e-10
    )
    expected = (weights / weights.sum(0)).T.reshape(4, 10, 6)
    torch.testing.assert_close(layer_distribution(batched, -1), expected, equal_nan=True)


def test_uncentred_variance_is_the_published_formula_bit_for_bit():
    totals = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    layers = torch.arange(6).unsqueeze(1)
    probs = totals / totals.sum(0)
    mean = (probs * layers).sum(0)
    published = (probs * layers**2).sum(0) - mean**2
    assert torch.equal(layer_mean(totals), mean)
    assert torch.equal(layer_variance(totals, centred=False), published)


def test_l0_counts_values_above_the_firing_threshold_by_default():
    assert FIRING_THRESHOLD == 1e-3
    values = torch.tensor([FIRING_THRESHOLD, FIRING_THRESHOLD * 1.01, 0.5]).view(1, 1, 1, 3)
    assert LayerwiseL0Norm(1)(values=values).item() == 2.0


def test_metrics_import_no_model_code():
    code = (
        "import sys, mlsae.metrics; "
        "print(sorted(m for m in sys.modules if m.startswith(('mlsae.model', 'mlsae.lm', "
        "'mlsae.analysis', 'mlsae.trainer'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
