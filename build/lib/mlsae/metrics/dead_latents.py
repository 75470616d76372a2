"""The fraction of latents that look dead over the tokens seen."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric


class DeadLatents(Metric):
    """The share of latents selected (at any layer, whatever their value) fewer than
    `tokens / dead_tokens_threshold` times, i.e. firing less often than a live
    latent must."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_latents: int, dead_tokens_threshold: float) -> None:
        super().__init__()
        self.n_latents = n_latents
        self.dead_tokens_threshold = dead_tokens_threshold
        self.add_state("latent_tokens", torch.zeros(n_latents), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self,
        indices: Int[Tensor, "layer batch pos k"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        **_: object,
    ) -> None:
        if mask is None:
            selected = indices.reshape(-1)
            self.tokens += indices.shape[1] * indices.shape[2]
        else:
            selected = indices[:, mask].reshape(-1)
            self.tokens += mask.sum()
        self.latent_tokens += torch.bincount(selected, minlength=self.n_latents).float()

    def compute(self) -> Float[Tensor, ""]:
        threshold = self.tokens / self.dead_tokens_threshold
        return (self.latent_tokens < threshold).sum(dtype=torch.float) / self.n_latents
