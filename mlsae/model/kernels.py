"""The Triton kernels where the original kept its own (`mlsae.sparse.kernels` defines them;
importing this module needs Triton)."""

from mlsae.sparse.kernels import *  # noqa: F403
from mlsae.sparse.kernels import triton_decode

__all__ = ["triton_decode"]
