"""Every decode backend against an independent dense reference, forward and backward."""

import contextlib
import importlib
import sys
from unittest import mock

import pytest
import torch

from mlsae.model.decoder import BACKENDS
from mlsae.sparse import backend as backends
from mlsae.sparse import decoder, native
from mlsae.sparse.decoder import decode, scatter_topk
from mlsae.types import TopK

pytest.importorskip("triton")
kernels = importlib.import_module("mlsae.sparse.kernels")

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
KERNELS = (
    "decode_forward_kernel",
    "decode_backward_values_kernel",
    "decode_backward_weight_kernel",
)


def random_indices(leading, k, n_latents, generator):
    scores = torch.rand(*leading, n_latents, generator=generator)
    return scores.argsort(dim=-1)[..., :k]


def reference(values, indices, weight, grad):
    """fp64: scatter into dense latents, multiply by the transposed decoder."""
    values = values.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    dense = torch.zeros(*values.shape[:-1], weight.shape[1], dtype=torch.float64)
    dense = dense.scatter_add(-1, indices.long(), values)
    out = dense @ weight.T
    grad_values, grad_weight = torch.autograd.grad(out, (values, weight), grad.double())
    return out, grad_values, grad_weight


def check(backend, values, indices, weight, seed=0):
    values = values.detach().requires_grad_()
    weight = weight.detach().requires_grad_() if weight.is_leaf else weight
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(*values.shape[:-1], weight.shape[0], generator=generator)
    grad = grad.to(values.dtype)

    out = decode(TopK(values, indices), weight, backend)
    assert out.shape == (*values.shape[:-1], weight.shape[0])
    assert out.dtype == values.dtype
    grad_values, grad_weight = torch.autograd.grad(out, (values, weight), grad)
    assert grad_values.dtype == values.dtype and grad_weight.dtype == weight.dtype

    expected = reference(values, indices, weight, grad)
    tolerance = TOLERANCES[values.dtype]
    for actual, wanted in zip((out, grad_values, grad_weight), expected, strict=True):
        torch.testing.assert_close(actual.double(), wanted.to(actual.dtype).double(), **tolerance)


@pytest.fixture
def launches():
    """Mocks wrapping each Triton kernel's launch, to count them."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(
                mock.patch.object(getattr(kernels, name), "run", wraps=getattr(kernels, name).run)
            )
            for name in KERNELS
        }


def assert_launched(backend, launches):
    for name in KERNELS:
        assert launches[name].called == (backend == "triton"), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_inputs", [49, 64])
@pytest.mark.parametrize("leading", [(6,), (2, 3, 2)])
def test_matches_reference(backend, n_inputs, leading, launches):
    generator = torch.Generator().manual_seed(n_inputs)
    n_latents, k = 24, 5
    weight = torch.randn(n_inputs, n_latents, generator=generator)
    values = torch.randn(*leading, k, generator=generator)
    indices = random_indices(leading, k, n_latents, generator)
    check(backend, values, indices, weight)
    assert_launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 16])
def test_k_extremes(backend, k, launches):
    generator = torch.Generator().manual_seed(k)
    n_latents = 16
    weight = torch.randn(49, n_latents, generator=generator)
    values = torch.randn(5, k, generator=generator)
    indices = random_indices((5,), k, n_latents, generator)
    check(backend, values, indices, weight)
    assert_launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_latent_chosen_by_every_vector(backend, launches):
    generator = torch.Generator().manual_seed(1)
    n_latents, n_vectors, k = 12, 70, 3
    indices = random_indices((n_vectors,), k, n_latents - 1, generator) + 1
    indices[:, 1] = 0
    weight = torch.randn(64, n_latents, generator=generator)
    values = torch.randn(n_vectors, k, generator=generator)
    check(backend, values, indices, weight)
    assert_launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_int32_indices(backend, launches):
    generator = torch.Generator().manual_seed(2)
    n_inputs, n_latents, k = 49, 20, 4
    latent_major = torch.randn(n_latents, n_inputs, generator=generator, requires_grad=True)
    weight = latent_major.T
    values = torch.randn(3, 5, 2 * k, generator=generator)[..., ::2].transpose(0, 1)
    indices = random_indices((3, 5), 2 * k, n_latents, generator)[..., 1::2].transpose(0, 1)
    indices = indices.int()
    assert not (weight.is_contiguous() or values.is_contiguous() or indices.is_contiguous())
    check(backend, values, indices, weight)
    assert_launched(backend, launches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_major_non_contiguous_weight(backend):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 2 * 16, generator=generator)[:, ::2]
    values = torch.randn(4, 3, generator=generator)
    indices = random_indices((4,), 3, 16, generator)
    check(backend, values, indices, weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    weight = torch.randn(49, 16, requires_grad=True)
    values = torch.randn(0, 3, 4, requires_grad=True)
    indices = torch.zeros(0, 3, 4, dtype=torch.long)
    out = decode(TopK(values, indices), weight, backend)
    assert out.shape == (0, 3, 49)
    out.sum().backward()
    assert values.grad.shape == values.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    generator = torch.Generator().manual_seed(4)
    n_latents, k = 32, 32
    weight = torch.randn(49, n_latents, generator=generator).to(dtype)
    # 32 terms of one sign: the output is compared to the fp64 result rounded to `dtype`.
    values = (torch.rand(6, k, generator=generator) + 1).to(dtype)
    indices = random_indices((6,), k, n_latents, generator)
    check(backend, values, indices, weight)


def test_auxk_like_k_in_triton(launches):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(49, 96, generator=generator)
    values = torch.randn(3, 70, generator=generator)
    indices = random_indices((3,), 70, 96, generator)
    check("triton", values, indices, weight)
    assert_launched("triton", launches)


def test_backends_agree_on_values_only_gradient():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(49, 16, generator=generator)
    indices = random_indices((5,), 3, 16, generator)
    grads = []
    for backend in BACKENDS:
        values = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
        values.requires_grad_()
        decode(TopK(values, indices), weight, backend).square().sum().backward()
        grads.append(values.grad)
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0])


def test_unknown_backend():
    topk = TopK(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="'nope'.*triton.*embedding_bag.*dense"):
        decode(topk, torch.randn(4, 8), backend="nope")


def test_triton_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlsae.sparse.kernels", None)
    backends._triton_imports.cache_clear()
    try:
        topk = TopK(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ImportError, match="needs Triton"):
            decode(topk, torch.randn(4, 8), backend="triton")
        assert backends.resolve_backend(torch.device("cuda"), 3, 8192) == "sparse"
    finally:
        backends._triton_imports.cache_clear()


def test_auto_selection_on_cpu(monkeypatch, launches):
    calls = []
    resolve = backends.resolve_backend
    monkeypatch.setattr(
        decoder, "resolve_backend", lambda *args: calls.append(args) or resolve(*args)
    )
    weight = torch.randn(49, 16)
    topk = TopK(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    out = decode(topk, weight)
    assert calls == [(torch.device("cpu"), 3, 16)]
    torch.testing.assert_close(out, decode(topk, weight, "dense"))
    assert not launches["decode_forward_kernel"].called


def test_scatter_topk():
    values = torch.tensor([[[1.0, -2.0], [3.0, 4.0]]], requires_grad=True)
    indices = torch.tensor([[[4, 0], [1, 1]]], dtype=torch.int32)
    dense = scatter_topk(TopK(values, indices), 5)
    expected = torch.tensor([[[-2.0, 0, 0, 0, 1.0], [0, 7.0, 0, 0, 0]]])
    assert torch.equal(dense, expected)
    dense.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


def test_scatter_topk_decodes_like_decode():
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(49, 16, generator=generator)
    topk = TopK(torch.randn(2, 3, 4, generator=generator), random_indices((2, 3), 4, 16, generator))
    torch.testing.assert_close(scatter_topk(topk, 16) @ weight.T, decode(topk, weight))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda(dtype):
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(512, 4096, generator=generator).to("cuda", dtype)
    values = torch.rand(300, 32, generator=generator).to("cuda", dtype).requires_grad_()
    indices = random_indices((300,), 32, 4096, generator).cuda()
    grad = torch.randn(300, 512, generator=generator).to("cuda", dtype)
    weight.requires_grad_()
    results = []
    for backend in ("triton", "dense"):
        out = decode(TopK(values, indices), weight, backend)
        results.append((out, *torch.autograd.grad(out, (values, weight), grad)))
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_embedding_bag_backward_with_and_without_the_c_kernel(use_native, monkeypatch):
    """The `native` backend's CPU backward runs `native.sparse_backward` (every entry counts,
    negative values included), the `sparse` backend's its torch path."""
    if use_native and not native.available():
        pytest.fail("the C kernels did not compile")
    generator = torch.Generator().manual_seed(5)
    n_latents, k = 300, 40  # latents chosen by several vectors, negative values
    weight = torch.randn(70, n_latents, generator=generator)
    values = torch.randn(2, 33, k, generator=generator)
    indices = random_indices((2, 33), k, n_latents, generator)
    with mock.patch.object(native, "sparse_backward", wraps=native.sparse_backward) as kernel:
        check("native" if use_native else "sparse", values, indices, weight)
    assert kernel.called == use_native
