"""The layerwise base (`LayerwiseRatio`) and the logging wrapper, as the original calls it."""

import pytest
import torch

from mlsae.metrics import (
    LayerwiseFVU,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseLogitMSE,
    LayerwiseMSE,
    LayerwiseWrapper,
    layerwise,
)


def test_layerwise_labels_every_layer_and_the_mean():
    values = torch.tensor([1.0, -2.0, 4.0]).view(3, 1, 1, 1)
    logged = layerwise(3)(LayerwiseL1Norm(3), prefix="l1/")(values=values)
    assert logged == {
        "l1/layer_0": 1.0,
        "l1/layer_1": 2.0,
        "l1/layer_2": 4.0,
        "l1/avg": pytest.approx(7 / 3),
    }


def test_one_layer_gives_its_value_and_the_mean():
    """torchmetrics squeezes a one-element result to a scalar (a single-layer SAE)."""
    wrapper = LayerwiseWrapper(LayerwiseL1Norm(1), layers=[5], prefix="l1/")
    wrapper.update(values=torch.tensor([-3.0]).view(1, 1, 1, 1))
    assert wrapper.compute() == {"l1/layer_5": 3.0, "l1/avg": 3.0}


@pytest.mark.parametrize(
    ("labels", "keys"),
    [
        (["layer_0", "layer_1"], ["p/layer_0", "p/layer_1"]),  # the original's call
        (["first", "second"], ["p/first", "p/second"]),
        ([3, 1], ["p/layer_3", "p/layer_1"]),  # layer indices
    ],
)
def test_wrapper_takes_the_original_positional_labels(labels, keys):
    wrapped = LayerwiseWrapper(LayerwiseMSE(2), labels, "p/")
    recons = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 1)
    logged = wrapped(inputs=torch.zeros(2, 1, 2, 1), recons=recons)
    assert list(logged) == [*keys, "p/avg"]
    assert [float(value) for value in logged.values()] == [1.0, 9.0, 5.0]


def test_wrapper_needs_labels_or_layers_and_a_prefix():
    with pytest.raises(TypeError, match="either labels or layers"):
        LayerwiseWrapper(LayerwiseMSE(1), prefix="p/")
    with pytest.raises(TypeError, match="either labels or layers"):
        LayerwiseWrapper(LayerwiseMSE(1), ["a"], "p/", layers=[0])
    with pytest.raises(TypeError, match="prefix"):
        LayerwiseWrapper(LayerwiseMSE(1), layers=[0])


def test_batches_of_different_sizes_accumulate_as_sums_over_sums():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 1, 3, 4, generator=generator), torch.randn(2, 2, 5, 4)
    first_recons, second_recons = first * 0.5, second + 1
    mask = torch.rand(2, 5, generator=generator) > 0.4
    mask[0, 0] = True

    def mse_var(x, r, m=None):
        x, r = (x.flatten(1, 2), r.flatten(1, 2)) if m is None else (x[:, m], r[:, m])
        return (r - x).pow(2).mean(dim=(1, 2)), x.flatten(1).var(dim=1)

    (mse1, var1), (mse2, var2) = mse_var(first, first_recons), mse_var(second, second_recons, mask)
    fvu, mse = LayerwiseFVU(2), LayerwiseMSE(2)
    for metric in (fvu, mse):
        metric.update(inputs=first, recons=first_recons)
        metric.update(inputs=second, recons=second_recons, mask=mask)
    torch.testing.assert_close(fvu.compute(), (mse1 + mse2) / (var1 + var2))
    torch.testing.assert_close(mse.compute(), (mse1 + mse2) / 2)

    l0, l1 = LayerwiseL0Norm(2), LayerwiseL1Norm(2)
    for metric in (l0, l1):
        metric.update(values=first)
        metric.update(values=second, mask=mask)
    tokens = 3 + mask.sum()
    kept = second[:, mask]
    torch.testing.assert_close(
        l0.compute(), ((first > 1e-3).sum(dim=(1, 2, 3)) + (kept > 1e-3).sum(dim=(1, 2))) / tokens
    )
    torch.testing.assert_close(
        l1.compute(), (first.abs().sum(dim=(1, 2, 3)) + kept.abs().sum(dim=(1, 2))) / tokens
    )

    logit_mse = LayerwiseLogitMSE(2)
    logit_mse.update(logit_mse=torch.tensor([1.0, 2.0]))
    logit_mse.update(logit_mse=torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(logit_mse.compute(), torch.tensor([2.0, 4.0]))
