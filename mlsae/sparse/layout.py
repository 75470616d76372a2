"""How the decoder is laid out in memory, and the reads that layout makes fast.

`MLSAE` stores its decoder latent-major: the `[n_inputs, n_latents]` weight of an
`nn.Linear(n_latents, n_inputs)` is the transpose of a contiguous `[n_latents, n_inputs]`
tensor, so that each latent's column is a contiguous row. The sparse decode gathers those
rows and its backward writes gradients in that layout, so neither needs a transposed copy,
and per-latent norms read contiguous memory.
"""

import weakref

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mlsae.sparse.tuning import TUNING


def latent_major_linear(n_latents: int, n_inputs: int) -> nn.Linear:
    """`nn.Linear(n_latents, n_inputs, bias=False)` whose weight is stored latent-major.

    Shape, values, state dict and checkpoints are those of a plain `nn.Linear`; loading
    copies into the parameter, keeping its layout.
    """
    decoder = nn.Linear(n_latents, n_inputs, bias=False)
    decoder.weight = nn.Parameter(decoder.weight.detach().t().contiguous().t())
    return decoder


def columnwise_dot(
    a: Float[Tensor, "rows columns"], b: Float[Tensor, "rows columns"]
) -> Float[Tensor, " columns"]:
    """`(a * b).sum(dim=0)`, `Tuning.column_block` columns at a time: the elementwise
    product of a whole decoder would be a fresh `[n_inputs, n_latents]` tensor, and on the
    CPU the page faults of such a fresh tensor cost more than the arithmetic."""
    out = a.new_empty(a.shape[1])
    block_width = TUNING.column_block
    for start in range(0, a.shape[1], block_width):
        block = slice(start, start + block_width)
        torch.linalg.vecdot(a[:, block], b[:, block], dim=0, out=out[block])
    return out


_LATENT_MAJOR: list[tuple[weakref.ref, int, weakref.ref]] = []


def latent_major(weight: Tensor) -> Tensor:
    """`weight.T` as an fp32 `[n_latents, n_inputs]` tensor with contiguous rows.

    For a latent-major fp32 weight (how `MLSAE` stores its decoder) this is a view. Any
    other weight is copied (a transpose of the whole decoder), and a training step decodes
    twice with the same weight (top-k, then AuxK), so the latest copy is remembered by
    weak references to it and to the weight, with the weight's version counter: a second
    decode of the same weight object reuses it while the first decode's graph still holds
    it, and any in-place update of the weight (the optimizer's) changes the version and
    misses.
    """
    weight_t = weight.t()
    if weight_t.dtype == torch.float32 and weight_t.stride(-1) == 1:
        return weight_t
    if _LATENT_MAJOR:
        weight_ref, version, copy_ref = _LATENT_MAJOR[0]
        cached = copy_ref()
        if cached is not None and weight_ref() is weight and version == weight._version:
            return cached
    copy = torch.empty(weight_t.shape, dtype=torch.float32, device=weight.device)
    copy.copy_(weight_t)
    _LATENT_MAJOR[:] = [(weakref.ref(weight), weight._version, weakref.ref(copy))]
    return copy
