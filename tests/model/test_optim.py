"""`make_adam`'s Adam against torch's on the same parameters stored contiguously."""

import pytest
import torch

from mlsae.model.autoencoder import MLSAE
from mlsae.model.optim import Adam, make_adam


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_transposed_parameters_update_exactly_as_contiguous_ones(fused, amsgrad):
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(40, 7, generator=generator)
    grads = [torch.randn(40, 7, generator=generator) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone().t())  # [7, 40], the transpose of a contiguous one
    theirs = torch.nn.Parameter(start.t().contiguous())
    ours_opt = Adam([ours], lr=1e-2, eps=1e-8, fused=fused, amsgrad=amsgrad)
    theirs_opt = torch.optim.Adam([theirs], lr=1e-2, eps=1e-8, fused=fused, amsgrad=amsgrad)
    for grad in grads:
        ours.grad = grad.clone().t()
        theirs.grad = grad.t().contiguous()
        ours_opt.step()
        theirs_opt.step()
    assert torch.equal(ours, theirs)
    assert ours.t().is_contiguous()
    state = ours_opt.state[ours]
    assert torch.equal(state["exp_avg_sq"], theirs_opt.state[theirs]["exp_avg_sq"])


def test_the_update_gets_contiguous_views_of_the_latent_major_decoder():
    model = MLSAE(8, 32, 4, auxk=8)
    optimizer = make_adam(model.parameters(), lr=1e-3, eps=1e-8)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    lists = [[] for _ in range(6)]
    optimizer._init_group(optimizer.param_groups[0], *lists)
    params, grads, exp_avgs, exp_avg_sqs = lists[:4]
    assert all(t.is_contiguous() for group in (params, grads, exp_avgs, exp_avg_sqs) for t in group)
    decoder = model.decoder.weight
    (view,) = [p for p in params if p.data_ptr() == decoder.data_ptr()]
    assert view.shape == decoder.t().shape


def test_a_skipped_step_leaves_transposed_parameters_unchanged():
    param = torch.nn.Parameter(torch.randn(30, 5).t())
    before = param.detach().clone()
    optimizer = make_adam([param], lr=1e-2, eps=1e-8)
    param.grad = torch.ones(30, 5).t()
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert torch.equal(param, before)
