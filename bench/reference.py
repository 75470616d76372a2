"""Reference TopK SAE training steps for the benchmarks.

- "dense": `mlsae.model.reference.ReferenceSAE`: dense pre-activations, `torch.topk`, AuxK's
  top-k over the dead latents, decode by a dense matmul, autograd's backward, the two
  decoder-maintenance passes, fused Adam.
- "original": the original mlsae's step: the same selection, decode through
  `torch.sparse_coo_tensor` and `torch.sparse.mm`, dense backward, foreach Adam.

One step of either computes the same loss and gradients as `mlsae.model.MLSAE` (to float
rounding; the top-k sets are identical).
"""

import torch
from torch import Tensor

from mlsae.model.reference import ReferenceSAE


class OriginalStyleSAE(ReferenceSAE):
    """`ReferenceSAE` decoding as the original did, through a sparse COO matmul."""

    def _decode(self, pre: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        leading, k = values.shape[:-1], values.shape[-1]
        n_vectors, n_latents = leading.numel(), pre.shape[-1]
        rows = torch.arange(n_vectors, device=values.device).repeat_interleave(k)
        coords = torch.stack([rows, indices.reshape(-1)])
        latents = torch.sparse_coo_tensor(coords, values.reshape(-1), (n_vectors, n_latents))
        return torch.sparse.mm(latents, self.decoder.t()).reshape(*leading, -1)


def reference_step(
    sae: ReferenceSAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    dead_mask: Tensor,
    auxk_coef: float,
) -> Tensor:
    """One training step of a reference SAE; returns the (detached) loss."""
    loss = sae.loss(x, dead_mask, auxk_coef)
    loss.backward()
    sae.maintain_decoder()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
