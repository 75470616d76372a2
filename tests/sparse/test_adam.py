"""`LatentMajorAdam` against torch's Adam on the same parameters stored contiguously, and
its skipped steps."""

import pytest
import torch

from mlsae.model.autoencoder import MLSAE
from mlsae.sparse.adam import LatentMajorAdam, make_adam


@pytest.mark.parametrize("fused", [True, False])
def test_transposed_parameters_update_exactly_as_contiguous_ones(fused):
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(40, 7, generator=generator)
    grads = [torch.randn(40, 7, generator=generator) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone().t())  # [7, 40], the transpose of a contiguous one
    theirs = torch.nn.Parameter(start.t().contiguous())
    ours_opt = LatentMajorAdam([ours], lr=1e-2, eps=1e-8, fused=fused)
    theirs_opt = torch.optim.Adam([theirs], lr=1e-2, eps=1e-8, fused=fused)
    for grad in grads:
        ours.grad = grad.clone().t()
        theirs.grad = grad.t().contiguous()
        ours_opt.step()
        theirs_opt.step()
    assert torch.equal(ours, theirs)
    assert ours.t().is_contiguous()
    ours_state, theirs_state = ours_opt.state[ours], theirs_opt.state[theirs]
    assert torch.equal(ours_state["exp_avg_sq"], theirs_state["exp_avg_sq"])
    assert ours_state["step"].dtype == theirs_state["step"].dtype
    assert ours_state["step"].device == theirs_state["step"].device
    assert ours_opt.state_dict()["param_groups"] == theirs_opt.state_dict()["param_groups"]


def test_state_dicts_are_interchangeable_with_torch_adam():
    """A checkpoint of torch's Adam resumes in ours and the other way round."""
    model = MLSAE(8, 32, 4, auxk=8)
    theirs = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8, fused=True)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    theirs.step()
    ours = make_adam(model.parameters(), lr=1e-3, eps=1e-8)
    ours.load_state_dict(theirs.state_dict())
    ours.step()
    theirs.step()
    back = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8, fused=True)
    back.load_state_dict(ours.state_dict())
    for param in model.parameters():
        assert ours.state[param]["step"].item() == 3 == back.state[param]["step"].item()


def test_the_update_keeps_the_latent_major_layout():
    model = MLSAE(8, 32, 4, auxk=8)
    optimizer = make_adam(model.parameters(), lr=1e-3, eps=1e-8)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    decoder = model.decoder.weight
    assert decoder.t().is_contiguous() and not decoder.is_contiguous()
    assert optimizer.state[decoder]["exp_avg"].t().is_contiguous()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_skip_step_if(fused, skip):
    param = torch.nn.Parameter(torch.randn(30, 5).t())
    before = param.detach().clone()
    optimizer = LatentMajorAdam([param], lr=1e-2, eps=1e-8, fused=fused)
    param.grad = torch.ones(30, 5).t()
    optimizer.skip_step_if(torch.tensor(skip))
    optimizer.step()
    assert torch.equal(param, before) == skip
    assert (int(optimizer.state[param].get("step", 0)) == 0) == skip
    optimizer.step()  # the flag holds for one step only
    assert optimizer.state[param]["step"].item() == (1 if skip else 2)


def test_a_gradient_scalers_found_inf_skips_the_step():
    param = torch.nn.Parameter(torch.randn(30, 5).t())
    before = param.detach().clone()
    optimizer = make_adam([param], lr=1e-2, eps=1e-8)
    param.grad = torch.ones(30, 5).t()
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert torch.equal(param, before)
