"""The original's training losses as metrics: `MSELoss` and `AuxiliaryLoss`."""

import numpy as np
import pytest
import torch

from mlsae.metrics import AuxiliaryLoss, MSELoss
from mlsae.metrics.reconstruction import auxk_loss
from mlsae.model import losses as model_losses


def kept(x: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """`[layer, vectors, n_inputs]` in float64: the positions that count."""
    x = x.detach().double()
    return (x.flatten(1, 2) if mask is None else x[:, mask]).numpy()


def reference_mean_fvu(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
    """Per layer, the summed MSEs over the summed unbiased variances, then the mean."""
    mse_sum, var_sum = 0.0, 0.0
    for inputs, recons, mask in batches:
        x, r = kept(inputs, mask), kept(recons, mask)
        mse_sum = mse_sum + ((r - x) ** 2).mean(axis=(1, 2))
        var_sum = var_sum + x.reshape(len(x), -1).var(axis=1, ddof=1)
    return float((mse_sum / var_sum).mean())


def reference_auxk(inputs, recons, auxk_recons, mask) -> float:
    """Per layer, the squared distance of `auxk_recons` from the error over the error's
    squared distance from its mean (per feature), then the mean over layers."""
    error = kept(inputs, mask) - kept(recons, mask)
    aux = kept(auxk_recons, mask)
    squared = ((aux - error) ** 2).sum(axis=(1, 2))
    variance = ((error - error.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    return float((squared / variance).mean())


def random_batch(generator, masked: bool, pos: int = 5):
    inputs = torch.randn(3, 2, pos, 4, generator=generator) * 2 + 1
    recons = inputs + torch.randn(3, 2, pos, 4, generator=generator) * 0.5
    mask = torch.rand(2, pos, generator=generator) > 0.3 if masked else None
    if mask is not None:
        mask[0, 0] = True
    return inputs, recons, mask


@pytest.mark.parametrize("masked", [False, True])
def test_mse_loss_is_the_mean_fvu_over_batches(masked):
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(generator, masked, pos) for pos in (5, 7)]
    metric = MSELoss(3)
    for inputs, recons, mask in batches:
        metric.update(inputs=inputs, recons=recons, mask=mask)
    assert metric.compute().item() == pytest.approx(reference_mean_fvu(batches), rel=1e-5)
    assert metric(inputs=batches[0][0], recons=batches[0][1], mask=batches[0][2]).item() == (
        pytest.approx(reference_mean_fvu(batches[:1]), rel=1e-5)
    )


def test_mse_loss_is_a_differentiable_loss_that_accumulates_without_a_graph():
    inputs, recons, _ = random_batch(torch.Generator().manual_seed(1), masked=False)
    recons.requires_grad_()
    metric = MSELoss(3)
    loss = metric(inputs=inputs, recons=recons)
    loss.backward()
    # d/dr mean_l(mean((r - x)^2) / var_l) = 2 (r - x) / (n_elements var_l n_layers)
    x, r = inputs.double(), recons.detach().double()
    var = x.flatten(1).var(dim=1, unbiased=True).view(-1, 1, 1, 1)
    expected = 2 * (r - x) / (x[0].numel() * var * 3)
    torch.testing.assert_close(recons.grad.double(), expected, rtol=1e-5, atol=1e-9)
    assert not metric.compute().requires_grad


@pytest.mark.parametrize("masked", [False, True])
def test_auxk_formula_equals_the_training_loss(masked):
    generator = torch.Generator().manual_seed(2)
    inputs, recons, mask = random_batch(generator, masked)
    auxk_recons = torch.randn(inputs.shape, generator=generator) * 0.3
    error = inputs - recons
    expected = reference_auxk(inputs, recons, auxk_recons, mask)
    assert auxk_loss(error, auxk_recons, mask).item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(
        auxk_loss(error, auxk_recons, mask), model_losses.auxk_loss(error, auxk_recons, mask)
    )


@pytest.mark.parametrize("masked", [False, True])
def test_auxiliary_loss_is_the_coefficient_times_the_mean_auxk_loss(masked):
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        inputs, recons, mask = random_batch(generator, masked)
        batches.append((inputs, recons, torch.randn(inputs.shape, generator=generator), mask))
    metric = AuxiliaryLoss(0.25)
    for inputs, recons, auxk_recons, mask in batches:
        metric.update(inputs=inputs, recons=recons, auxk_recons=auxk_recons, mask=mask)
    metric.update(inputs=inputs, recons=recons, auxk_recons=None)  # no dead latents
    expected = 0.25 * np.mean([reference_auxk(*batch) for batch in batches])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)
    assert metric.compute().shape == ()


def test_auxiliary_loss_trains_only_the_auxiliary_reconstruction():
    generator = torch.Generator().manual_seed(4)
    inputs, recons, _ = random_batch(generator, masked=False)
    inputs.requires_grad_(), recons.requires_grad_()
    auxk_recons = torch.randn(inputs.shape, generator=generator).requires_grad_()
    loss = AuxiliaryLoss(0.5)(inputs=inputs, recons=recons, auxk_recons=auxk_recons)
    loss.backward()
    assert inputs.grad is None and recons.grad is None
    error = (inputs - recons).detach()
    centred = error - error.mean(dim=(1, 2), keepdim=True)
    variance = centred.pow(2).sum(dim=(1, 2, 3), keepdim=True)
    expected = 0.5 * 2 * (auxk_recons.detach() - error) / (variance * 3)
    torch.testing.assert_close(auxk_recons.grad, expected, rtol=1e-5, atol=1e-8)


def test_auxiliary_loss_without_any_auxiliary_reconstruction_is_zero():
    metric = AuxiliaryLoss(1 / 32)
    inputs = torch.randn(2, 1, 3, 4)
    assert metric(inputs=inputs, recons=inputs, auxk_recons=None).item() == 0.0
    assert metric.compute().item() == 0.0
