"""The one backend choice: what `auto` resolves to, the environment switches, and the
decode kernel each backend uses."""

import pytest
import torch

from mlsae.sparse import backend
from mlsae.sparse.backend import decode_kernel, resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def clean_environment(monkeypatch):
    for name in ("MLSAE_BACKEND", "USE_TRITON", "MLSAE_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto(clean_environment):
    monkeypatch = clean_environment
    monkeypatch.setattr(backend, "native_available", lambda: True)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert resolve_backend(CPU, 32, 8192) == "native"
    assert resolve_backend(CPU, 512, 8192) == "sparse"  # k a sixteenth of the latents
    assert resolve_backend(CUDA, 32, 8192) == "triton"
    assert resolve_backend(torch.device("mps"), 32, 8192) == "sparse"
    monkeypatch.setattr(backend, "native_available", lambda: False)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert resolve_backend(CPU, 32, 8192) == "fused"
    assert resolve_backend(CUDA, 32, 8192) == "sparse"


def test_environment_switches(clean_environment):
    monkeypatch = clean_environment
    monkeypatch.setenv("MLSAE_BACKEND", "dense")
    assert resolve_backend(CPU, 32, 8192) == "dense"
    assert resolve_backend(CPU, 32, 8192, "sparse") == "sparse"  # asked for explicitly
    monkeypatch.setenv("MLSAE_BACKEND", "auto")
    monkeypatch.setenv("MLSAE_NATIVE", "0")
    assert not backend.native_available()
    assert resolve_backend(CPU, 32, 8192) == "fused"
    monkeypatch.setenv("USE_TRITON", "0")
    assert not backend.triton_available()
    assert resolve_backend(CUDA, 32, 8192) == "sparse"
    monkeypatch.setenv("MLSAE_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'.*native, fused, sparse"):
        resolve_backend(CPU, 32, 8192)


def test_the_fused_backends_run_on_the_cpu_only(clean_environment):
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend(CUDA, 32, 8192, "native")


def test_decode_kernels():
    assert decode_kernel("native", 32, 8192) == "embedding_bag"
    assert decode_kernel("fused", 4096, 8192) == "embedding_bag"
    assert decode_kernel("sparse", 32, 8192) == "embedding_bag"
    assert decode_kernel("sparse", 512, 8192) == "dense"
    assert decode_kernel("triton", 32, 8192) == "triton"
    assert decode_kernel("dense", 32, 8192) == "dense"
    assert decode_kernel("embedding_bag", 4096, 8192) == "embedding_bag"
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode_kernel("nope", 1, 2)


def test_uses_native_only_for_fp32_cpu_tensors():
    assert backend.uses_native("native", torch.zeros(2), torch.zeros(3))
    assert not backend.uses_native("fused", torch.zeros(2))
    assert not backend.uses_native("native", torch.zeros(2, dtype=torch.float64))
    assert not backend.uses_native("native", torch.zeros(2, dtype=torch.bfloat16))
