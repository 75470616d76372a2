"""`fused_autoencode` against dense autograd, and `MLSAE` with and without it."""

import pytest
import torch

from mlsae.model.autoencoder import MLSAE
from mlsae.model.losses import auxk_loss, layerwise_fvu
from mlsae.sparse import FUSED_BACKENDS, fused_backward
from mlsae.sparse.fused import fused_autoencode
from mlsae.sparse.layout import latent_major_linear
from mlsae.sparse.tuning import TUNING


def _problem(seed: int, n_vectors=23, n_inputs=12, n_latents=96):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_vectors, n_inputs, generator=generator, dtype=torch.float64)
    bias = torch.randn(n_inputs, generator=generator, dtype=torch.float64) * 0.1
    encoder = torch.randn(n_latents, n_inputs, generator=generator, dtype=torch.float64)
    decoder = torch.randn(n_latents, n_inputs, generator=generator, dtype=torch.float64).t()
    return inputs, bias, encoder, decoder


def _loss_weights(seed: int, *shapes):
    generator = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]


@pytest.mark.parametrize("n_dead", [0, 5, 20, 40])  # dense AuxK up to 32
@pytest.mark.parametrize("inputs_grad", [False, True])
@pytest.mark.parametrize("mostly_negative", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_equal_dense_autograd(n_dead, inputs_grad, mostly_negative, dtype):
    """The `native` backend: float64 takes the torch backward, float32 the C kernels; the
    reference is dense autograd in float64 either way."""
    inputs, bias, encoder, decoder = _problem(n_dead)
    if mostly_negative:  # most pre-activations negative: ReLU zeroes top-k and AuxK entries
        inputs, bias = inputs.abs(), bias.abs() * 0
        encoder[3:] = -encoder[3:].abs()
    inputs, bias, encoder, decoder = (t.to(dtype) for t in (inputs, bias, encoder, decoder))
    k, auxk = 6, 8
    dead = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:n_dead]
    leaves = [t.clone().requires_grad_() for t in (inputs, bias, encoder, decoder)]
    leaves[0].requires_grad_(inputs_grad)
    out = fused_autoencode(*leaves, k, auxk, dead, "native")
    inputs, bias, encoder, decoder = (t.double() for t in (inputs, bias, encoder, decoder))
    n_aux = min(auxk, n_dead)
    assert out.topk.indices.shape == (23, k) and out.auxk.indices.shape == (23, n_aux)
    if mostly_negative:  # the backward leaves zeroed entries out of its order
        assert (out.topk.values == 0).any() and (n_dead == 0 or (out.auxk.values == 0).any())
    w_dec, w_aux, w_val, w_auxval = _loss_weights(n_dead, (23, 12), (23, 12), (23, k), (23, n_aux))
    loss = (
        (out.decoded * w_dec).sum()
        + (out.auxk_decoded * w_aux).sum()
        + (out.topk.values * w_val).sum()
        + (out.auxk.values * w_auxval).sum()
    )
    loss.backward()

    ref = [t.clone().requires_grad_() for t in (inputs, bias, encoder, decoder)]
    ref[0].requires_grad_(inputs_grad)
    pre = (ref[0] - ref[1]) @ ref[2].T
    values = pre.gather(1, out.topk.indices).relu()
    auxk_values = pre.gather(1, out.auxk.indices).relu()
    latents = torch.zeros_like(pre).scatter(1, out.topk.indices, values)
    auxk_latents = torch.zeros_like(pre).scatter(1, out.auxk.indices, auxk_values)
    decoded, auxk_decoded = latents @ ref[3].T, auxk_latents @ ref[3].T
    ref_loss = (
        (decoded * w_dec).sum()
        + (auxk_decoded * w_aux).sum()
        + (values * w_val).sum()
        + (auxk_values * w_auxval).sum()
    )
    ref_loss.backward()

    # The selections are the dense top-k's in the inputs' dtype (no ties in random data).
    selecting = ((leaves[0] - leaves[1]) @ leaves[2].T).detach()
    expected_top = selecting.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(out.topk.indices.sort(-1).values, expected_top)
    if n_dead:
        masked = torch.full_like(selecting, float("-inf"))
        masked[:, dead] = selecting[:, dead]
        expected_aux = masked.topk(n_aux, dim=-1).indices.sort(-1).values
        assert torch.equal(out.auxk.indices.sort(-1).values, expected_aux)
    # The decode accumulates in fp32.
    error = 1e-5 if dtype == torch.float64 else 1e-4
    tolerance = {"rtol": error, "atol": error}
    torch.testing.assert_close(out.decoded.double(), decoded, **tolerance)
    torch.testing.assert_close(out.auxk_decoded.double(), auxk_decoded, **tolerance)
    for ours, theirs in zip(leaves, ref, strict=True):
        if theirs.grad is None:
            assert ours.grad is None
        else:
            assert ours.grad.dtype == dtype
            torch.testing.assert_close(ours.grad.double(), theirs.grad, **tolerance)
    assert leaves[3].grad.stride() == leaves[3].stride()  # the latent-major layout


def _mlsae_loss(model: MLSAE, x: torch.Tensor) -> torch.Tensor:
    result = model.forward_standardized(x)
    output = result.output
    loss = layerwise_fvu(x, output.recons).mean()
    if output.auxk is not None:
        loss = loss + auxk_loss(result.inputs - result.recons, output.auxk_recons) / 32
    return loss + output.topk.values.sum() * 1e-3


@pytest.mark.parametrize("auxk", [None, 16])
def test_mlsae_forward_and_gradients_with_and_without_fusion(monkeypatch, auxk):
    torch.manual_seed(0)
    model = MLSAE(32, 256, 4, auxk=auxk, dead_tokens_threshold=1)
    model.update_dead_latents(torch.arange(256) % 3, 1)  # a third of the latents fired
    x = torch.randn(3, 2, 7, 32) * 2 + 1
    assert model._backend(x) in FUSED_BACKENDS
    results = {}
    for fused in (True, False):
        model.backend = None if fused else "sparse"
        model.zero_grad(set_to_none=True)
        output = model(x)
        _mlsae_loss(model, x).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[fused] = (output, grads)
    (fused_out, fused_grads), (plain_out, plain_grads) = results[True], results[False]
    # The C top-k may order a vector's selection differently from torch.topk.
    assert torch.equal(*(_by_latent(out.topk) for out in (fused_out, plain_out)))
    torch.testing.assert_close(fused_out.recons, plain_out.recons)
    if auxk is None:
        assert fused_out.auxk is None and fused_out.auxk_recons is None
    else:
        assert torch.equal(*(_by_latent(out.auxk) for out in (fused_out, plain_out)))
        # Unfused, AuxK's 16 of 256 latents decode densely (k >= 1/16 of the latents).
        torch.testing.assert_close(fused_out.auxk_recons, plain_out.auxk_recons)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6)


def test_fusion_is_used_only_where_the_decode_is_embedding_bag():
    model = MLSAE(8, 64, 2, auxk=4)
    assert model._backend(torch.randn(3, 8)) in FUSED_BACKENDS
    large_k = MLSAE(8, 64, 16, auxk=4)  # k >= 1/16 of the latents: the sparse backend
    assert large_k._backend(torch.randn(3, 8)) == "sparse"
    assert MLSAE(8, 64, 2, auxk=4)(torch.randn(0, 8)).recons.shape == (0, 8)


def _by_latent(topk) -> torch.Tensor:
    """A selection as (latent, value) pairs in latent order, per vector."""
    indices, order = topk.indices.sort(dim=-1)
    return torch.stack([indices.double(), topk.values.gather(-1, order).double()])


def _fp32_decode(topk, weight: torch.Tensor) -> torch.Tensor:
    """`decode(topk, weight)` as one fp32 matmul over dense latents (the bf16 values exact)."""
    dense = torch.zeros(*topk.values.shape[:-1], weight.shape[1])
    return dense.scatter(-1, topk.indices, topk.values.float()) @ weight.float().T


@pytest.mark.parametrize("n_dead", [2048, 200])  # AuxK decoded sparsely, then densely
def test_bfloat16_autoencoder_runs_fused_with_fp32_accumulation(n_dead):
    """A bfloat16 MLSAE runs the fused core, and each decode of its 64 latents is their fp32
    sum rounded once to bfloat16 (within one bfloat16 ulp); bfloat16 sums miss by far more."""
    torch.manual_seed(0)
    model = MLSAE(32, 4096, 64, auxk=64, dead_tokens_threshold=1).to(torch.bfloat16)
    model.update_dead_latents((torch.arange(4096) >= n_dead).long(), 1)
    assert model.decoder.weight.t().is_contiguous() and not model.pre_encoder_bias.any()
    x = torch.randn(2, 1, 24, 32).bfloat16()
    assert model._backend(x) in FUSED_BACKENDS
    result = model.forward_standardized(x)
    output = result.output
    assert output.recons.dtype == torch.bfloat16 and output.auxk.indices.shape[-1] == 64
    # With a zero bias, the standardised reconstruction is the top-k decode itself.
    bf16_rounding = {"rtol": 2**-7, "atol": 1e-5}  # 2**-8 is bfloat16's unit roundoff
    expected = _fp32_decode(output.topk, model.decoder.weight)
    torch.testing.assert_close(result.recons.float(), expected, **bf16_rounding)
    expected_auxk = _fp32_decode(output.auxk, model.decoder.weight)
    torch.testing.assert_close(output.auxk_recons.float(), expected_auxk, **bf16_rounding)
    _mlsae_loss(model, x).backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_latent_major_linear_is_a_plain_linear_map():
    linear = latent_major_linear(10, 4)
    x = torch.randn(3, 10)
    torch.testing.assert_close(linear(x), x @ linear.weight.T)


def test_gradients_when_only_the_reconstruction_is_used():
    inputs, bias, encoder, decoder = _problem(7)
    dead = torch.arange(0, 96, 3)
    leaves = [t.clone().requires_grad_() for t in (bias, encoder, decoder)]
    out = fused_autoencode(inputs, *leaves, 6, 8, dead)
    out.decoded.pow(2).sum().backward()  # no gradient reaches the values or AuxK's decode

    ref = [t.clone().requires_grad_() for t in (bias, encoder, decoder)]
    pre = (inputs - ref[0]) @ ref[1].T
    latents = torch.zeros_like(pre).scatter(1, out.topk.indices, pre.gather(1, out.topk.indices))
    (latents.relu() @ ref[2].T).pow(2).sum().backward()
    for ours, theirs in zip(leaves, ref, strict=True):  # the decode accumulates in fp32
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)


def test_under_cpu_autocast_fused_and_plain_paths_agree(monkeypatch):
    torch.manual_seed(0)
    model = MLSAE(32, 256, 4, auxk=8, dead_tokens_threshold=1)
    model.update_dead_latents(torch.arange(256) % 2, 1)
    x = torch.randn(2, 1, 9, 32)
    results = {}
    for fused in (True, False):
        model.backend = None if fused else "sparse"
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
            loss = _mlsae_loss(model, x)
        loss.backward()
        results[fused] = (output, {n: p.grad.clone() for n, p in model.named_parameters()})
    (fused_out, fused_grads), (plain_out, plain_grads) = results[True], results[False]
    assert fused_out.recons.dtype == plain_out.recons.dtype
    assert torch.equal(fused_out.topk.indices, plain_out.topk.indices)
    torch.testing.assert_close(fused_out.recons, plain_out.recons)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(("n_dead", "dense"), [(20, True), (32, True), (33, False)])
def test_auxk_over_few_dead_latents_takes_dense_products(n_dead, dense, monkeypatch):
    """With at most `Tuning.dense_auxk_dead_per_slot` dead latents per AuxK slot, AuxK's
    decode and gradients are matmuls over the dead columns; they equal the sparse pass's."""
    from unittest import mock

    inputs, bias, encoder, decoder = (t.float() for t in _problem(n_dead))
    dead = torch.randperm(96, generator=torch.Generator().manual_seed(2))[:n_dead]
    weights = _loss_weights(n_dead, (23, 12), (23, 12), (23, 8))
    results = {}
    for per_slot in (TUNING.dense_auxk_dead_per_slot, 0):  # 0: always sparse
        monkeypatch.setattr(TUNING, "dense_auxk_dead_per_slot", per_slot)
        leaves = [t.clone().requires_grad_() for t in (inputs, bias, encoder, decoder)]
        with mock.patch.object(
            fused_backward,
            "add_dense_auxk_gradients",
            wraps=fused_backward.add_dense_auxk_gradients,
        ) as spy:
            out = fused_autoencode(*leaves, 6, 8, dead, "native")
            loss = (out.decoded * weights[0]).sum() + (out.auxk_decoded * weights[1]).sum()
            (loss + (out.auxk.values * weights[2].float()).sum()).backward()
        assert spy.called == (dense and per_slot > 0)
        results[per_slot] = (out.auxk_decoded.detach(), [leaf.grad for leaf in leaves])
    (dense_decoded, dense_grads), (sparse_decoded, sparse_grads) = results.values()
    torch.testing.assert_close(dense_decoded, sparse_decoded)
    for ours, theirs in zip(dense_grads, sparse_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
