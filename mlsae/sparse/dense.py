"""The `dense` backend's encoder: a dense matmul and `torch.topk`, differentiated by autograd
(its decode is `decode`'s "dense" kernel). The reference the sparse paths are tested against."""

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.types import TopK


def dense_topk_encode(
    inputs: Float[Tensor, "vectors n_inputs"],
    weight: Float[Tensor, "n_latents n_inputs"],
    k: int,
    auxk: int | None = None,
    dead_indices: Int[Tensor, " n_dead"] | None = None,
    bias: Float[Tensor, " n_inputs"] | None = None,
) -> tuple[TopK, TopK]:
    """`topk_encode` by a dense matmul and `torch.topk`: the k largest pre-activations of
    `(inputs - bias) @ weight.T`, and the `min(auxk, n_dead)` largest among `dead_indices`."""
    pre_activations = F.linear(inputs if bias is None else inputs - bias, weight)
    values, indices = pre_activations.topk(k, dim=-1, sorted=False)
    n_dead = 0 if not auxk or dead_indices is None else dead_indices.numel()
    if n_dead == 0:
        empty = torch.empty((inputs.shape[0], 0), dtype=torch.long, device=inputs.device)
        return TopK(values, indices), TopK(pre_activations[:, :0], empty)
    dead = pre_activations.index_select(1, dead_indices)
    auxk_values, positions = dead.topk(min(auxk, n_dead), dim=-1, sorted=False)
    return TopK(values, indices), TopK(auxk_values, dead_indices[positions])
