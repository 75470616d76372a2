"""The MLSAE written with dense tensors and autograd: the reference the tests and the
benchmarks compare the library's fast paths with.

It holds its own copies of the weights (`from_mlsae`), computes every pre-activation, selects
with `torch.topk`, decodes with a dense matmul and leaves the gradients to autograd, so its
values and gradients follow from the formulas alone. The other architectures
(docs/variants.md) are written densely too: BatchTopK sorts every ReLU'd pre-activation of a
pool (a stable sort, so that among equal values the lower vector, then the lower latent, comes
first), JumpReLU keeps every pre-activation above the threshold, and Matryoshka decodes each
prefix of the dense latents.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn


class ReferenceOutput(NamedTuple):
    """The dense forward's tensors (leading shape of the inputs)."""

    values: Float[Tensor, "... k"]
    """The top-k pre-activations, after ReLU (the other architectures: every latent's
    activation, zeros where not selected)."""

    indices: Int[Tensor, "... k"]
    recons: Float[Tensor, "... n_inputs"]
    """The reconstructions, in the space of the inputs."""

    inputs_std: Float[Tensor, "... n_inputs"]
    recons_std: Float[Tensor, "... n_inputs"]
    """`W_dec relu(topk) + b`, before un-standardisation."""

    auxk_recons: Float[Tensor, "... n_inputs"] | None
    """`W_dec relu(auxk)` (no bias), None without dead latents or AuxK."""

    prefix_recons: tuple[Float[Tensor, "... n_inputs"], ...] = ()
    """Matryoshka: the reconstruction from each prefix of the latents; () otherwise."""


class ReferenceSAE(nn.Module):
    """The parameters of `MLSAE` (encoder, decoder, pre-encoder bias) with a dense forward."""

    def __init__(
        self,
        encoder: Float[Tensor, "n_latents n_inputs"],
        decoder: Float[Tensor, "n_inputs n_latents"],
        bias: Float[Tensor, " n_inputs"],
        k: int,
        auxk: int | None,
        standardize: bool = True,
        selection: str = "topk",
        pool: str = "stack",
        widths: tuple[int, ...] = (),
        threshold: float | None = None,
    ) -> None:
        """`selection`: `topk`, `batchtopk` (in training) or `jumprelu` at `threshold`;
        `pool`: BatchTopK's (`stack` or `layer`); `widths`: Matryoshka's prefixes."""
        super().__init__()
        self.encoder = nn.Parameter(encoder.detach().clone())
        self.decoder = nn.Parameter(decoder.detach().clone())
        self.pre_encoder_bias = nn.Parameter(bias.detach().clone())
        self.k, self.auxk, self.standardize = k, auxk, standardize
        self.selection, self.pool, self.widths, self.threshold = selection, pool, widths, threshold

    @classmethod
    def from_mlsae(cls, sae: nn.Module, dtype: torch.dtype | None = None) -> "ReferenceSAE":
        """A reference with copies of `sae`'s weights (in `dtype`, e.g. float64), selecting
        as `sae` does in its mode (training or inference)."""
        variant = getattr(sae, "variant", None)
        options = {}
        if variant is not None and variant.architecture != "topk":
            selection = variant.selection
            threshold = None
            if variant.batchtopk and not sae.training:
                selection, threshold = "jumprelu", float(sae.batchtopk_threshold)
            options = dict(selection=selection, pool=variant.pool, threshold=threshold)
            options["widths"] = variant.widths
        reference = cls(
            sae.encoder.weight, sae.decoder.weight, sae.pre_encoder_bias, sae.k, sae.auxk,
            sae.standardize, **options,
        )  # fmt: skip
        return reference if dtype is None else reference.to(dtype)

    def forward(
        self,
        x: Float[Tensor, "... n_inputs"],
        dead: Bool[Tensor, " n_latents"] | None = None,
        mask: Bool[Tensor, "..."] | None = None,
    ) -> ReferenceOutput:
        mean = std = None
        inputs_std = x
        if self.standardize:
            mean = x.mean(-1, keepdim=True)
            std = (x - mean).std(-1, keepdim=True)
            inputs_std = (x - mean) / (std + 1e-5)
        pre = (inputs_std - self.pre_encoder_bias) @ self.encoder.T
        if self.selection == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            values = values.relu()
            latents = torch.zeros_like(pre).scatter(-1, indices, values)
        else:
            latents = self._select(pre, mask)
            indices = torch.arange(pre.shape[-1], device=pre.device).expand(pre.shape)
            values = latents
        recons_std = latents @ self.decoder.T + self.pre_encoder_bias
        recons = recons_std if std is None else recons_std * std + mean
        prefix_recons = []
        for width in self.widths:
            prefix = latents[..., :width] @ self.decoder[:, :width].T + self.pre_encoder_bias
            prefix_recons.append(prefix if std is None else prefix * std + mean)
        auxk_recons = None
        n_dead = 0 if dead is None or self.auxk is None else int(dead.sum())
        if n_dead:
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            auxk_values, auxk_indices = dead_pre.topk(min(self.auxk, n_dead), dim=-1)
            auxk_recons = self._decode(pre, auxk_values.relu(), auxk_indices)
        return ReferenceOutput(
            values, indices, recons, inputs_std, recons_std, auxk_recons, tuple(prefix_recons)
        )

    def _select(self, pre: Tensor, mask: Tensor | None) -> Tensor:
        """BatchTopK's or JumpReLU's dense latents."""
        if self.selection == "jumprelu":
            return pre * (pre > self.threshold)
        acts = pre.relu()
        leading = acts.shape[:-1]
        flat = acts.reshape(-1, acts.shape[-1])
        counted = torch.ones(flat.shape[0], dtype=torch.bool, device=pre.device)
        if mask is not None:
            counted = mask.expand(leading).reshape(-1)
        n_pools = leading[0] if self.pool == "layer" and len(leading) >= 2 else 1
        keep = torch.zeros_like(flat, dtype=torch.bool)
        for rows, part, part_counted in zip(
            torch.arange(flat.shape[0], device=pre.device).chunk(n_pools),
            flat.chunk(n_pools),
            counted.chunk(n_pools),
            strict=True,
        ):
            scores = part.masked_fill(~part_counted[:, None], float("-inf")).reshape(-1)
            order = scores.sort(descending=True, stable=True).indices
            chosen = order[: self.k * int(part_counted.sum())]
            keep[rows[chosen // flat.shape[1]], chosen % flat.shape[1]] = True
        return (flat * keep).reshape(acts.shape)

    def _decode(self, pre: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        latents = torch.zeros_like(pre).scatter(-1, indices, values)
        return latents @ self.decoder.T

    def loss(
        self,
        x: Float[Tensor, "layer batch pos n_inputs"],
        dead: Bool[Tensor, " n_latents"] | None = None,
        auxk_coef: float = 1 / 32,
        mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, ""]:
        """The training loss, written out: per layer, the FVU over the positions that count
        (`mask`), averaged over layers; plus `auxk_coef` times AuxK's squared error against
        the detached residual error over that error's variance, averaged over layers."""
        out = self.forward(x, dead, mask)
        w = x.new_ones(1, *x.shape[1:3], 1) if mask is None else mask.to(x.dtype)[None, ..., None]
        n_vectors = w.sum()
        n_elements = n_vectors * x.shape[-1]
        mean = (x * w).sum(dim=(1, 2, 3), keepdim=True) / n_elements
        variance = ((x - mean).pow(2) * w).sum(dim=(1, 2, 3)) / (n_elements - 1)
        loss = x.new_zeros(())
        for recons in out.prefix_recons or (out.recons,):  # Matryoshka: a plain sum
            mse = ((recons - x).pow(2) * w).sum(dim=(1, 2, 3)) / n_elements
            loss = loss + (mse / variance).mean()
        if out.auxk_recons is not None:
            error = (out.inputs_std - out.recons_std).detach()
            error_mean = (error * w).sum(dim=(1, 2), keepdim=True) / n_vectors
            squared = ((out.auxk_recons - error).pow(2) * w).sum(dim=(1, 2, 3))
            error_variance = ((error - error_mean).pow(2) * w).sum(dim=(1, 2, 3))
            auxk = torch.nan_to_num(squared / error_variance, nan=0.0, posinf=0.0).mean()
            loss = loss + auxk_coef * auxk
        return loss

    @torch.no_grad()
    def maintain_decoder(self) -> None:
        """Unit-norm decoder columns, then the gradient without its component along them."""
        self.decoder.div_(self.decoder.norm(dim=0, keepdim=True))
        grad = self.decoder.grad
        grad.sub_((grad * self.decoder).sum(dim=0, keepdim=True) * self.decoder)
