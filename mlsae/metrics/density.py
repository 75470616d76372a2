"""How often each latent fires at each layer over an evaluation, as SAEBench reports it.

A latent's density at a layer is the fraction of the positions that count on which it
fires (its activation is above 0) when the autoencoder encodes that layer's vector: the
`feature_density` of SAEBench's core evaluation, as if the layer had its own SAE. The
metrics count firings over every batch, so the densities are over the whole evaluation.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric

DENSE_DENSITY = 0.1
"""The density above which a latent counts as dense: SAEBench's `freq_over_10_percent`."""


class LayerwiseLatentDensity(Metric):
    """Per layer and latent: the fraction of positions that count on which the latent's
    activation is above 0 (`compute`); subclasses summarise it per layer."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_layers: int, n_latents: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.n_latents = n_latents
        fired = torch.zeros(n_layers, n_latents, dtype=torch.long)
        self.add_state("fired", fired, dist_reduce_fx="sum")
        self.add_state("positions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        values: Float[Tensor, "layer batch pos k"],
        indices: Int[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        fires = values > 0
        if mask is not None:
            fires = fires & mask[None, :, :, None]
        layer = torch.arange(self.n_layers, device=indices.device).view(-1, 1, 1, 1)
        flat = (indices + layer * self.n_latents)[fires]
        # bincount without weights: deterministic on CUDA too.
        counts = torch.bincount(flat, minlength=self.n_layers * self.n_latents)
        self.fired += counts.view(self.n_layers, self.n_latents)
        self.positions += indices.shape[1] * indices.shape[2] if mask is None else mask.sum()

    def compute(self) -> Float[Tensor, "layer latent"]:
        return self.fired.double().div(self.positions).float()


class LayerwiseNeverFired(LayerwiseLatentDensity):
    """Per layer: the fraction of latents whose density there is 0 (SAEBench's
    `1 - frac_alive`, had the layer its own SAE)."""

    def compute(self) -> Float[Tensor, " layer"]:
        return (self.fired == 0).float().mean(dim=-1)


class LayerwiseDenseLatents(LayerwiseLatentDensity):
    """Per layer: the fraction of latents whose density there is above `threshold`
    (SAEBench's `freq_over_10_percent` by default)."""

    def __init__(self, n_layers: int, n_latents: int, threshold: float = DENSE_DENSITY) -> None:
        super().__init__(n_layers, n_latents)
        self.threshold = threshold

    def compute(self) -> Float[Tensor, " layer"]:
        return (super().compute() > self.threshold).float().mean(dim=-1)
