"""Which implementation runs the autoencoder's sparse steps: one value, chosen here.

| backend  | encode and top-k                | decode                      | where          |
| -------- | ------------------------------- | --------------------------- | -------------- |
| `native` | chunked matmul + C top-k        | fused core, C backward      | CPU, fp32      |
| `fused`  | chunked matmul + blocked top-k  | fused core, torch backward  | CPU            |
| `sparse` | `topk_encode` (sparse backward) | `embedding_bag` (or dense)  | anywhere       |
| `triton` | `topk_encode` (sparse backward) | the Triton kernels          | CUDA           |
| `dense`  | dense matmul, `torch.topk`      | dense matmul, autograd      | anywhere       |

All compute the same function and gradients (to float rounding; among tied values the
top-k may keep another index). `dense` is the reference the others are tested against.

The environment switches are read here and nowhere else:

- `MLSAE_BACKEND`: one of `BACKENDS`, or `auto` (the default);
- `USE_TRITON=0`: `auto` never picks `triton`;
- `MLSAE_NATIVE=0`: `auto` never picks `native` (and the C kernels are never compiled).
"""

import functools
import logging
import os
from typing import Literal

import torch
from torch import Tensor

from mlsae.sparse.tuning import TUNING

logger = logging.getLogger(__name__)

Backend = Literal["native", "fused", "sparse", "triton", "dense"]
BACKENDS: tuple[Backend, ...] = ("native", "fused", "sparse", "triton", "dense")
FUSED_BACKENDS = ("native", "fused")
"""The backends whose forward is one autograd function over encode, ReLU and decode."""

DecodeKernel = Literal["triton", "embedding_bag", "dense"]
DECODE_KERNELS: tuple[DecodeKernel, ...] = ("triton", "embedding_bag", "dense")


def native_allowed() -> bool:
    """Whether the C kernels may be used (`MLSAE_NATIVE` is not "0")."""
    return os.environ.get("MLSAE_NATIVE", "1") != "0"


def native_available() -> bool:
    """Whether the C kernels are allowed, compiled and loaded (compiling on first use)."""
    if not native_allowed():
        return False
    from mlsae.sparse import native

    return native.available()


def triton_available() -> bool:
    """Whether the Triton kernels are allowed (`USE_TRITON` is not "0") and import."""
    return os.environ.get("USE_TRITON", "1") != "0" and _triton_imports()


@functools.cache
def _triton_imports() -> bool:
    try:
        import mlsae.sparse.kernels  # noqa: F401
    except Exception as error:  # a broken install can fail with more than ImportError
        logger.debug("Triton unavailable: %s", error)
        return False
    return True


def resolve_backend(
    device: torch.device, k: int, n_latents: int, requested: str | None = None
) -> Backend:
    """The backend for k of n_latents on `device`: `requested` (or `MLSAE_BACKEND`), or
    with `auto`, `triton` on CUDA where Triton runs; on the CPU `native` where the C
    kernels are compiled, else `fused`; elsewhere, or where k is a large share of the
    latents (`Tuning.dense_decode_k_share`), `sparse`."""
    requested = requested or os.environ.get("MLSAE_BACKEND") or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(
                f"unknown backend {requested!r} (MLSAE_BACKEND): choose one of "
                f"{', '.join(BACKENDS)} or auto"
            )
        if requested in FUSED_BACKENDS and device.type != "cpu":
            raise ValueError(f"the {requested!r} backend runs on the CPU, not {device.type}")
        return requested  # type: ignore[return-value]
    if device.type == "cuda":
        return "triton" if triton_available() else "sparse"
    if device.type != "cpu" or k >= TUNING.dense_decode_k_share * n_latents:
        return "sparse"
    return "native" if native_available() else "fused"


def uses_native(backend: str, *tensors: Tensor) -> bool:
    """Whether `backend` runs the C kernels on these tensors (fp32, on the CPU)."""
    return backend == "native" and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


def decode_kernel(backend: str, k: int, n_latents: int) -> DecodeKernel:
    """How `backend` decodes k of n_latents latents: `native` and `fused` by
    `embedding_bag`, `sparse` too unless k is a large share of the latents
    (`Tuning.dense_decode_k_share`). A decode kernel's name is accepted as itself, as
    `mlsae.model.decoder.decode` takes them."""
    if backend in DECODE_KERNELS:
        return backend  # type: ignore[return-value]
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown decode backend {backend!r}: choose one of "
            f"{', '.join(DECODE_KERNELS + BACKENDS[:3])}"
        )
    if backend == "sparse" and k >= TUNING.dense_decode_k_share * n_latents:
        return "dense"
    return "embedding_bag"
