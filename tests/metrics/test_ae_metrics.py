import pytest
import torch

from mlsae.metrics import (
    DeadLatents,
    LayerwiseFVU,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseMSE,
    LayerwiseWrapper,
)
from mlsae.model.losses import auxk_loss, layerwise_fvu
from tests.goldens import load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("golden-ae.safetensors")


def test_golden_layerwise_metrics(golden):
    x, recons, values = golden["x"], golden["fwd.recons"], golden["fwd.topk_values"]
    fvu, mse = LayerwiseFVU(4), LayerwiseMSE(4)
    torch.testing.assert_close(fvu(inputs=x, recons=recons), golden["metric.fvu"])
    torch.testing.assert_close(mse(inputs=x, recons=recons), golden["metric.mse"])
    torch.testing.assert_close(LayerwiseL0Norm(4, 1e-3)(values=values), golden["metric.l0"])
    torch.testing.assert_close(LayerwiseL1Norm(4)(values=values), golden["metric.l1"])
    dead = DeadLatents(384, 1000)(indices=golden["fwd.topk_indices"])
    torch.testing.assert_close(dead, golden["metric.dead_latents"])
    torch.testing.assert_close(layerwise_fvu(x, recons).mean(), golden["metric.mse_loss"])


def masked_reference(inputs, recons, mask):
    kept_inputs, kept_recons = inputs[:, mask], recons[:, mask]
    mse = (kept_recons - kept_inputs).pow(2).mean(dim=(1, 2))
    return mse, kept_inputs.var(dim=(1, 2))


def test_masked_fvu_and_mse_ignore_excluded_positions():
    inputs, recons = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    mask = torch.rand(2, 6) > 0.3
    mask[0, 0] = False
    mse, var = masked_reference(inputs, recons, mask)
    torch.testing.assert_close(LayerwiseFVU(3)(inputs=inputs, recons=recons, mask=mask), mse / var)
    torch.testing.assert_close(LayerwiseMSE(3)(inputs=inputs, recons=recons, mask=mask), mse)
    garbage = inputs.clone()
    garbage[:, ~mask] = 1e6
    torch.testing.assert_close(layerwise_fvu(garbage, recons, mask), mse / var)


def test_masked_l0_l1_dead_latents():
    values = torch.tensor([[[[1.0, 0.0005], [2.0, 3.0]]]])  # 1 layer, 1 batch, 2 pos, k 2
    indices = torch.tensor([[[[0, 1], [2, 3]]]])
    mask = torch.tensor([[True, False]])
    # torchmetrics squeezes a one-element result to a scalar
    assert LayerwiseL0Norm(1, 1e-3)(values=values, mask=mask).item() == 1.0
    assert LayerwiseL0Norm(1, 1e-3)(values=values).item() == 1.5
    assert LayerwiseL1Norm(1)(values=values, mask=mask).item() == pytest.approx(1.0005)
    # one counted token; latents 2 and 3 were only selected at the excluded position
    assert DeadLatents(5, 1)(indices=indices, mask=mask).item() == pytest.approx(3 / 5)


def test_metrics_accumulate_over_batches():
    l1 = LayerwiseL1Norm(1)
    l1.update(values=torch.ones(1, 1, 2, 3))
    l1.update(values=3 * torch.ones(1, 1, 2, 3))
    assert l1.compute().item() == 6.0


def test_layerwise_wrapper_names():
    wrapped = LayerwiseWrapper(LayerwiseL1Norm(2), layers=[3, 1], prefix="l1/")
    logged = wrapped(values=torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
    assert set(logged) == {"l1/layer_3", "l1/layer_1", "l1/avg"}
    assert logged["l1/avg"].item() == pytest.approx(1.5)


def test_auxk_loss_is_normalised_and_detached():
    error = torch.randn(2, 3, 4, 8, requires_grad=True)
    perfect = error.detach().clone().requires_grad_()
    assert auxk_loss(error, perfect).item() == pytest.approx(0.0)
    zeros = torch.zeros(2, 3, 4, 8, requires_grad=True)
    loss = auxk_loss(error, zeros)
    e = error.detach()
    centred = e - e.mean(dim=(1, 2), keepdim=True)
    expected = (e.pow(2).sum(dim=(1, 2, 3)) / centred.pow(2).sum(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert error.grad is None and zeros.grad is not None


def test_auxk_loss_masks_positions():
    error = torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    recons = torch.randn(1, 2, 3, 4)
    changed = recons.clone()
    changed[:, ~mask] = 100.0
    torch.testing.assert_close(auxk_loss(error, recons, mask), auxk_loss(error, changed, mask))
