import pytest
import torch

from mlsae.sparse.encoder import topk_encode


def dense_reference(inputs, weight, k, auxk, dead):
    pre = inputs @ weight.T
    top = pre.topk(k, dim=-1)
    masked = pre.masked_fill(~dead, float("-inf"))
    aux = masked.topk(min(auxk, int(dead.sum())), dim=-1)
    return top, aux


@pytest.mark.parametrize(("n_vectors", "k", "auxk"), [(7, 3, 5), (1, 16, 16), (0, 2, 2)])
def test_values_and_gradients_match_dense_autograd(n_vectors, k, auxk):
    generator = torch.Generator().manual_seed(n_vectors + k)
    inputs = torch.randn(n_vectors, 9, generator=generator, dtype=torch.float64)
    weight = torch.randn(16, 9, generator=generator, dtype=torch.float64)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 5, 9, 11, 15]] = True

    x1, w1 = inputs.clone().requires_grad_(), weight.clone().requires_grad_()
    topk, aux = topk_encode(x1, w1, k, auxk, dead.nonzero().squeeze(-1))
    x2, w2 = inputs.clone().requires_grad_(), weight.clone().requires_grad_()
    top_ref, aux_ref = dense_reference(x2, w2, k, auxk, dead)

    order, order_ref = topk.indices.argsort(-1), top_ref.indices.argsort(-1)
    assert torch.equal(topk.indices.gather(-1, order), top_ref.indices.gather(-1, order_ref))
    aux_order, aux_order_ref = aux.indices.argsort(-1), aux_ref.indices.argsort(-1)
    assert torch.equal(aux.indices.gather(-1, aux_order), aux_ref.indices.gather(-1, aux_order_ref))
    assert dead[aux.indices].all()

    weights_top = torch.linspace(-1, 2, k, dtype=torch.float64)
    weights_aux = torch.linspace(3, -2, aux.values.shape[-1], dtype=torch.float64)
    loss = (topk.values.gather(-1, order) * weights_top).sum()
    loss = loss + (aux.values.gather(-1, aux_order) * weights_aux).sum()
    loss_ref = (top_ref.values.gather(-1, order_ref) * weights_top).sum()
    loss_ref = loss_ref + (aux_ref.values.gather(-1, aux_order_ref) * weights_aux).sum()
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_no_dead_latents_gives_empty_auxk_and_topk_gradient_only():
    inputs = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(32, 8, requires_grad=True)
    topk, aux = topk_encode(inputs, weight, 4, 8, torch.empty(0, dtype=torch.long))
    assert aux.values.shape == (4, 0)
    topk.values.sum().backward()
    touched = (weight.grad != 0).any(dim=1)
    assert set(touched.nonzero().squeeze(-1).tolist()) <= set(topk.indices.unique().tolist())
