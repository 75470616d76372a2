"""Reference TopK SAE training steps for the benchmarks, written with dense autograd.

- "dense": dense pre-activations, `torch.topk`, AuxK's top-k over all latents with the live
  ones masked to -inf, decode by scattering into dense `[vectors, n_latents]` latents and one
  matmul, autograd's backward, the two decoder-maintenance passes, fused Adam.
- "original": the original mlsae's step: the same selection, decode through
  `torch.sparse_coo_tensor` and `torch.sparse.mm`, dense backward, foreach Adam.

Both use the library's losses and standardisation, so one step computes the same loss and
gradients as `mlsae.model.MLSAE` (to float rounding; the top-k sets are identical).
"""

import torch
from torch import Tensor, nn

from mlsae.model.autoencoder import standardize, unstandardize
from mlsae.model.losses import auxk_loss, layerwise_fvu


class ReferenceSAE(nn.Module):
    """The parameters of `MLSAE` (encoder, decoder, pre-encoder bias) with a dense forward."""

    def __init__(self, encoder: Tensor, decoder: Tensor, bias: Tensor, k: int, auxk: int | None):
        super().__init__()
        self.encoder = nn.Parameter(encoder.clone())  # [n_latents, n_inputs]
        self.decoder = nn.Parameter(decoder.clone())  # [n_inputs, n_latents]
        self.pre_encoder_bias = nn.Parameter(bias.clone())
        self.k, self.auxk = k, auxk

    def _decode(self, values: Tensor, indices: Tensor, sparse_coo: bool) -> Tensor:
        n_vectors, k = values.shape
        n_latents = self.decoder.shape[1]
        if sparse_coo:
            rows = torch.arange(n_vectors, device=values.device).repeat_interleave(k)
            coords = torch.stack([rows, indices.reshape(-1)])
            latents = torch.sparse_coo_tensor(coords, values.reshape(-1), (n_vectors, n_latents))
            return torch.sparse.mm(latents, self.decoder.t())
        dense = values.new_zeros(n_vectors, n_latents).scatter(-1, indices, values)
        return dense @ self.decoder.t()

    def loss(self, x: Tensor, dead_mask: Tensor, auxk_coef: float, sparse_coo: bool) -> Tensor:
        x_std, stats = standardize(x)
        flat = (x_std - self.pre_encoder_bias).reshape(-1, x.shape[-1])
        pre = flat @ self.encoder.t()
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        recons_std = self._decode(values.relu(), indices, sparse_coo).reshape(x.shape)
        recons_std = recons_std + self.pre_encoder_bias
        recons = unstandardize(recons_std, stats)
        loss = layerwise_fvu(x, recons).mean()
        n_dead = int(dead_mask.sum())
        if self.auxk is not None and n_dead > 0:
            masked = pre.masked_fill(~dead_mask, float("-inf"))
            aux_values, aux_indices = masked.topk(min(self.auxk, n_dead), dim=-1, sorted=False)
            aux_recons = self._decode(aux_values.relu(), aux_indices, sparse_coo).reshape(x.shape)
            loss = loss + auxk_coef * auxk_loss(x_std - recons_std, aux_recons)
        return loss

    @torch.no_grad()
    def maintain_decoder(self) -> None:
        """`unit_norm_decoder` then `unit_norm_decoder_gradient`, as two plain passes."""
        self.decoder.div_(self.decoder.norm(dim=0, keepdim=True))
        grad = self.decoder.grad
        grad.sub_((grad * self.decoder).sum(dim=0, keepdim=True) * self.decoder)


def reference_step(
    sae: ReferenceSAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    dead_mask: Tensor,
    auxk_coef: float,
    sparse_coo: bool,
) -> Tensor:
    """One training step of a reference SAE; returns the (detached) loss."""
    loss = sae.loss(x, dead_mask, auxk_coef, sparse_coo)
    loss.backward()
    sae.maintain_decoder()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
