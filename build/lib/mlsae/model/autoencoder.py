"""The Multi-Layer Sparse Autoencoder: one TopK SAE shared by every layer's inputs."""

import logging
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mlsae.model.decoder import choose_backend, decode
from mlsae.model.encoder import topk_encode
from mlsae.model.fused import fused_autoencode
from mlsae.model.hub import StrictHubMixin
from mlsae.model.types import Stats, TopK

logger = logging.getLogger(__name__)

DEFAULT_DEAD_TOKENS_THRESHOLD = 10_000_000

FUSED_FORWARD = True
"""Whether `MLSAE.forward` may run the fused sparse core (see `MLSAE._fuses`); the tests
turn it off to compare against the unfused path."""


class EncoderOutput(NamedTuple):
    """What `MLSAE.encode` returns."""

    topk: TopK
    """The k largest pre-activations of every vector (before ReLU) and their latents."""

    auxk: TopK | None
    """The largest pre-activations among dead latents (at most `auxk` of them; an
    empty selection when no latent is dead), or None when `auxk` is None."""

    stats: Stats | None
    """The statistics removed by standardisation, or None without it."""

    dead: Float[Tensor, ""]
    """The fraction of latents that are dead."""


class AutoencoderOutput(NamedTuple):
    """What `MLSAE.forward` returns."""

    topk: TopK
    """The k largest latents of every vector, after ReLU."""

    recons: Float[Tensor, "... n_inputs"]
    """The reconstructions, in the space of the inputs."""

    auxk: TopK | None
    """AuxK's selection among dead latents, after ReLU (None when `auxk` is None)."""

    auxk_recons: Float[Tensor, "... n_inputs"] | None
    """AuxK's model of the residual error `standardised inputs - (decode(topk) +
    pre_encoder_bias)`: `decode(auxk)` in the standardised space, with no bias."""

    dead: Float[Tensor, ""]
    """The fraction of latents that are dead."""


class StandardizedOutput(NamedTuple):
    """`MLSAE.forward` together with the standardised-space tensors AuxK needs."""

    output: AutoencoderOutput
    inputs: Float[Tensor, "... n_inputs"]
    """The encoder's inputs before the pre-encoder bias is subtracted."""

    recons: Float[Tensor, "... n_inputs"]
    """`decode(topk) + pre_encoder_bias`, before un-standardisation."""


def standardize(
    x: Float[Tensor, "... n_inputs"], eps: float = 1e-5
) -> tuple[Float[Tensor, "... n_inputs"], Stats]:
    """Per vector: subtract the mean, divide by the unbiased std plus `eps`."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + eps), Stats(mean, std)


def unstandardize(x: Float[Tensor, "... n_inputs"], stats: Stats) -> Float[Tensor, "... n_inputs"]:
    """The inverse map of `standardize`, as the original applies it: no eps."""
    return x * stats.std + stats.mean


@torch.no_grad()
def unit_norm_decoder(decoder: nn.Linear) -> None:
    """Scale every decoder column (one per latent) to unit norm, in place."""
    decoder.weight.div_(decoder.weight.norm(dim=0, keepdim=True))


@torch.no_grad()
def unit_norm_decoder_gradient(decoder: nn.Linear) -> None:
    """Remove from each column's gradient its component along that column.

    Assumes unit-norm columns (call `unit_norm_decoder` first).
    """
    weight, grad = decoder.weight, decoder.weight.grad
    if grad is None:
        raise ValueError("the decoder has no gradient: call this after backward")
    parallel = (grad * weight).sum(dim=0, keepdim=True)
    grad.sub_(parallel * weight)


@torch.no_grad()
def maintain_decoder(decoder: nn.Linear) -> None:
    """`unit_norm_decoder` then `unit_norm_decoder_gradient`, fused: four passes over the
    decoder (column norms, the division, the gradient's components along the columns, its
    update) with no `[n_inputs, n_latents]` temporaries. Equal to the two functions to
    float rounding."""
    weight, grad = decoder.weight, decoder.weight.grad
    if grad is None:
        raise ValueError("the decoder has no gradient: call this after backward")
    weight.div_(torch.linalg.vector_norm(weight, dim=0))
    grad.addcmul_(weight, columnwise_dot(grad, weight), value=-1)


COLUMN_BLOCK = 4096
"""`columnwise_dot` works through this many columns at a time."""


def columnwise_dot(
    a: Float[Tensor, "rows columns"], b: Float[Tensor, "rows columns"]
) -> Float[Tensor, " columns"]:
    """`(a * b).sum(dim=0)`, a block of columns at a time: the elementwise product of a
    whole decoder would be a fresh `[n_inputs, n_latents]` tensor, and on the CPU the page
    faults of such a fresh tensor cost more than the arithmetic."""
    out = a.new_empty(a.shape[1])
    for start in range(0, a.shape[1], COLUMN_BLOCK):
        block = slice(start, start + COLUMN_BLOCK)
        torch.linalg.vecdot(a[:, block], b[:, block], dim=0, out=out[block])
    return out


def latent_major_linear(n_latents: int, n_inputs: int) -> nn.Linear:
    """`nn.Linear(n_latents, n_inputs, bias=False)` whose `[n_inputs, n_latents]` weight is
    stored latent-major: the transpose of a contiguous `[n_latents, n_inputs]` tensor, so
    that each latent's decoder column is a contiguous row.

    The sparse decode gathers those rows and its backward produces gradients in that
    layout, so neither needs a transposed copy, and the per-latent norms of decoder
    maintenance read contiguous memory. Shape, values, state dict and checkpoints are those
    of a plain `nn.Linear`; loading copies into the parameter, keeping its layout.
    """
    decoder = nn.Linear(n_latents, n_inputs, bias=False)
    decoder.weight = nn.Parameter(decoder.weight.detach().t().contiguous().t())
    return decoder


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MLSAE(
    nn.Module,
    StrictHubMixin,
    repo_url="https://github.com/tim-lawson/mlsae",
    language="en",
    library_name="mlsae",
    license="mit",
):
    """Multi-Layer Sparse Autoencoder (Lawson et al., arXiv 2409.04185).

    One TopK sparse autoencoder applied to the residual stream of every layer:
    inputs of shape `[layer, batch, pos, n_inputs]` (any leading shape works)
    are all encoded by the same weights.

    Dead latents are tracked in tokens: `tokens_since_fired[i]` counts the
    tokens seen in training since latent i last fired (value >
    `dead_threshold`), and it is dead once that reaches `dead_tokens_threshold`.
    The training loop advances it with `update_dead_latents`, once per optimizer
    step; inference never does. `dead_steps_threshold` is kept because published
    checkpoints carry it in their config: the original counted forward passes with
    it, and here it has no effect. Likewise, a checkpoint's `last_nonzero` tensor
    (the original's per-forward counter) is accepted and dropped.

    The decoder weight is stored latent-major (`latent_major_linear`); on the CPU the
    forward runs the fused sparse core of `mlsae.model.fused`, elsewhere `topk_encode`
    and `decode`. Both compute the same function and the same gradients.
    """

    _optional_keys = ("tokens_since_fired",)
    _ignored_keys = ("last_nonzero",)
    _new_config_keys = ("dead_tokens_threshold",)

    tokens_since_fired: Int[Tensor, " n_latents"]

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        dead_steps_threshold: int | None = None,
        dead_threshold: float = 1e-3,
        auxk: int | None = 256,
        standardize: bool = True,
        dead_tokens_threshold: int = DEFAULT_DEAD_TOKENS_THRESHOLD,
    ) -> None:
        """
        Args:
            n_inputs: The size of each input vector (the transformer's d_model).
            n_latents: The number of latents.
            k: The number of latents kept per vector.
            dead_steps_threshold: Accepted for published checkpoints; no effect.
            dead_threshold: The activation above which a latent counts as fired.
            auxk: How many dead latents model the residual error (None: no AuxK).
            standardize: Whether to standardise every input vector.
            dead_tokens_threshold: Training tokens without firing after which a
                latent is dead.
        """
        super().__init__()
        _check_positive("n_inputs", n_inputs)
        _check_positive("n_latents", n_latents)
        _check_positive("k", k)
        _check_positive("auxk", auxk, allow_none=True)
        _check_positive("dead_tokens_threshold", dead_tokens_threshold)
        if k > n_latents:
            raise ValueError(f"k ({k}) must not exceed n_latents ({n_latents})")
        if auxk is not None and auxk > n_latents:
            raise ValueError(f"auxk ({auxk}) must not exceed n_latents ({n_latents})")

        self.n_inputs = n_inputs
        self.n_latents = n_latents
        self.k = k
        self.auxk = auxk
        self.dead_steps_threshold = dead_steps_threshold
        self.dead_threshold = dead_threshold
        self.standardize = standardize
        self.dead_tokens_threshold = dead_tokens_threshold

        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.decoder = latent_major_linear(n_latents, n_inputs)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self._dead_indices: Tensor | None = None

        with torch.no_grad():
            self.decoder.weight.copy_(self.encoder.weight.T)
        unit_norm_decoder(self.decoder)

    # Dead latents ---------------------------------------------------------------

    @property
    def dead_mask(self) -> Bool[Tensor, " n_latents"]:
        return self.tokens_since_fired >= self.dead_tokens_threshold

    def dead_latent_indices(self) -> Int[Tensor, " n_dead"]:
        """The dead latents, cached until the next `update_dead_latents`."""
        cached = self._dead_indices
        if cached is None or cached.device != self.tokens_since_fired.device:
            cached = self.dead_mask.nonzero().squeeze(-1)
            self._dead_indices = cached
        return cached

    def fired_counts(
        self, topk: TopK, mask: Bool[Tensor, "..."] | None = None
    ) -> Int[Tensor, " n_latents"]:
        """How many of the vectors selected each latent with value > `dead_threshold`.

        `mask` (True = counts) has the leading shape of the vectors; positions
        outside it are not counted.
        """
        fired = topk.values > self.dead_threshold
        if mask is not None:
            fired = fired & mask.unsqueeze(-1)
        counts = torch.zeros(self.n_latents, dtype=torch.long, device=topk.indices.device)
        return counts.scatter_add_(0, topk.indices.reshape(-1), fired.reshape(-1).long())

    @torch.no_grad()
    def update_dead_latents(
        self, fired_counts: Int[Tensor, " n_latents"], n_tokens: int | Int[Tensor, ""]
    ) -> None:
        """Advance the dead-latent state by one optimizer step of `n_tokens` tokens.

        `fired_counts` are this step's firing counts, summed over micro-batches
        (and ranks); latents that fired restart at 0, the others age by `n_tokens`.
        """
        aged = self.tokens_since_fired + n_tokens
        self.tokens_since_fired.copy_(torch.where(fired_counts > 0, 0, aged))
        self._dead_indices = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._dead_indices = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # Forward pass ---------------------------------------------------------------

    def _check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise ValueError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if not inputs.is_floating_point():
            raise ValueError(f"inputs must be floating point, got {inputs.dtype}")
        if inputs.ndim == 0 or inputs.shape[-1] != self.n_inputs:
            raise ValueError(
                f"inputs must have last dimension n_inputs={self.n_inputs}, "
                f"got shape {tuple(inputs.shape)}"
            )

    def _standardize(self, inputs: Tensor) -> tuple[Tensor, Stats | None]:
        if not self.standardize:
            return inputs, None
        return standardize(inputs)

    def _encode_standardized(self, inputs_std: Tensor) -> tuple[TopK, TopK | None]:
        leading = inputs_std.shape[:-1]
        flat = inputs_std.reshape(-1, self.n_inputs)
        dead_indices = self.dead_latent_indices() if self.auxk is not None else None
        topk, auxk = topk_encode(
            flat, self.encoder.weight, self.k, self.auxk, dead_indices, self.pre_encoder_bias
        )
        topk = TopK(*(t.reshape(*leading, t.shape[-1]) for t in topk))
        if self.auxk is None:
            return topk, None
        return topk, TopK(*(t.reshape(*leading, t.shape[-1]) for t in auxk))

    def _dead_fraction(self) -> Tensor:
        return self.dead_mask.float().mean()

    def encode(self, inputs: Float[Tensor, "... n_inputs"]) -> EncoderOutput:
        """Standardise, subtract the pre-encoder bias, encode, keep the k largest.

        The values are pre-activations, before ReLU.
        """
        self._check_inputs(inputs)
        inputs_std, stats = self._standardize(inputs)
        topk, auxk = self._encode_standardized(inputs_std)
        return EncoderOutput(topk, auxk, stats, self._dead_fraction())

    def decode(self, topk: TopK, stats: Stats | None = None) -> Float[Tensor, "... n_inputs"]:
        """`sum_i value_i * decoder column index_i + pre_encoder_bias`, un-standardised
        when `stats` are given."""
        recons = self._decode_latents(topk) + self.pre_encoder_bias
        return recons if stats is None else unstandardize(recons, stats)

    def _decode_latents(self, topk: TopK) -> Tensor:
        if topk.values.shape[-1] == 0:
            return topk.values.new_zeros((*topk.values.shape[:-1], self.n_inputs))
        return decode(topk, self.decoder.weight)

    def forward_standardized(self, inputs: Float[Tensor, "... n_inputs"]) -> StandardizedOutput:
        """`forward`, also returning the standardised inputs and reconstructions."""
        self._check_inputs(inputs)
        inputs_std, stats = self._standardize(inputs)
        if self._fuses(inputs_std):
            topk, auxk, decoded, auxk_recons = self._autoencode_fused(inputs_std)
        else:
            topk, auxk = self._encode_standardized(inputs_std)
            topk = TopK(torch.relu(topk.values), topk.indices)
            decoded = self._decode_latents(topk)
            auxk_recons = None
            if auxk is not None:
                auxk = TopK(torch.relu(auxk.values), auxk.indices)
                auxk_recons = self._decode_latents(auxk)
        recons_std = decoded + self.pre_encoder_bias
        recons = recons_std if stats is None else unstandardize(recons_std, stats)
        output = AutoencoderOutput(topk, recons, auxk, auxk_recons, self._dead_fraction())
        return StandardizedOutput(output, inputs_std, recons_std)

    def _fuses(self, inputs_std: Tensor) -> bool:
        """Whether `forward` runs the fused sparse core (`mlsae.model.fused`): where the
        decode would use the "embedding_bag" backend (the CPU, k small next to n_latents)."""
        return (
            FUSED_FORWARD
            and inputs_std.numel() > 0
            and choose_backend(inputs_std.device, self.k, self.n_latents) == "embedding_bag"
        )

    def _autoencode_fused(
        self, inputs_std: Tensor
    ) -> tuple[TopK, TopK | None, Tensor, Tensor | None]:
        leading = inputs_std.shape[:-1]
        dead_indices = self.dead_latent_indices() if self.auxk is not None else None
        fused = fused_autoencode(
            inputs_std.reshape(-1, self.n_inputs),
            self.pre_encoder_bias,
            self.encoder.weight,
            self.decoder.weight,
            self.k,
            self.auxk,
            dead_indices,
        )

        def unflatten(t: Tensor) -> Tensor:
            return t.reshape(*leading, t.shape[-1])

        topk = TopK(*map(unflatten, fused.topk))
        if self.auxk is None:
            return topk, None, unflatten(fused.decoded), None
        auxk = TopK(*map(unflatten, fused.auxk))
        return topk, auxk, unflatten(fused.decoded), unflatten(fused.auxk_decoded)

    def forward(self, inputs: Float[Tensor, "... n_inputs"]) -> AutoencoderOutput:
        """Encode, ReLU the k largest, decode. See `AutoencoderOutput`."""
        return self.forward_standardized(inputs).output
