"""The sparse decode where the original published it (`mlsae.sparse.decoder` defines it).

`decode(topk, weight, backend=None)` with `backend` one of `BACKENDS` ("triton",
"embedding_bag", "dense"); `scatter_topk(topk, n_latents)` gives dense latents.
`USE_TRITON=0` keeps the automatic choice off the Triton kernels.
"""

from mlsae.sparse.backend import DECODE_KERNELS as BACKENDS
from mlsae.sparse.decoder import decode, scatter_topk

__all__ = ["BACKENDS", "decode", "scatter_topk"]
