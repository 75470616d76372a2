"""The Multi-Layer Sparse Autoencoder: one TopK SAE shared by every layer's inputs.

For an input vector x (a residual-stream vector of any layer):

    x_std, (mu, s) = standardize(x)                  # per vector: (x - mu) / (s + 1e-5)
    pre            = W_enc (x_std - b)               # b: the pre-encoder bias
    topk           = the k largest entries of pre    # values before ReLU
    recons_std     = W_dec relu(topk) + b
    recons         = recons_std * s + mu

AuxK (Gao et al., 2024) also keeps the `auxk` largest pre-activations among the dead latents;
their reconstruction `W_dec relu(auxk)` (no bias) models the residual error
`x_std - recons_std`. The steps run on a backend of `mlsae.sparse`, chosen per call; all
compute this function. `architecture` selects otherwise (BatchTopK, Matryoshka:
`mlsae.model.variants`, docs/variants.md).
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mlsae import sparse
from mlsae.metrics import FIRING_THRESHOLD
from mlsae.model import variants
from mlsae.model.hub import StrictHubMixin
from mlsae.model.maintenance import (  # noqa: F401 (their home before maintenance.py)
    maintain_decoder,
    unit_norm_decoder,
    unit_norm_decoder_gradient,
)
from mlsae.model.outputs import AutoencoderOutput, EncoderOutput, StandardizedOutput
from mlsae.sparse import latent_major_linear
from mlsae.types import Stats, TopK

DEFAULT_DEAD_TOKENS_THRESHOLD = 10_000_000
VARIANT_DEFAULTS = {
    "architecture": "topk",
    "batchtopk_capacity": None,
    "batchtopk_pool": "stack",
    "matryoshka_widths": None,
    "matryoshka_selection": "batchtopk",
}
"""The architecture's options, which a TopK model's config does not hold."""


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

    `architecture` (`topk`, `batchtopk`, `matryoshka`) and its options are those of
    `mlsae.model.variants`; BatchTopK models (Matryoshka's by default) hold the threshold
    they use at inference in the float64 buffer `batchtopk_threshold`, which
    `update_batchtopk_threshold` moves once per optimizer step in training.

    `backend` (None: chosen per call, see `mlsae.sparse.backend`) names the
    implementation of the sparse steps; the decoder weight is stored latent-major
    (`mlsae.sparse.layout`), with the shape and state dict of a plain `nn.Linear`.
    """

    _optional_keys = ("tokens_since_fired",)
    _ignored_keys = ("last_nonzero",)
    _new_config_keys = ("dead_tokens_threshold", *VARIANT_DEFAULTS)

    tokens_since_fired: Int[Tensor, " n_latents"]

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        dead_steps_threshold: int | None = None,
        dead_threshold: float = FIRING_THRESHOLD,
        auxk: int | None = 256,
        standardize: bool = True,
        dead_tokens_threshold: int = DEFAULT_DEAD_TOKENS_THRESHOLD,
        architecture: str = "topk",
        batchtopk_capacity: int | None = None,
        batchtopk_pool: str = "stack",
        matryoshka_widths: list[int] | None = None,
        matryoshka_selection: str = "batchtopk",
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
            architecture, batchtopk_capacity, batchtopk_pool, matryoshka_widths,
                matryoshka_selection: see `mlsae.model.variants` (the default: TopK).
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
        self.backend: str | None = None
        options = (batchtopk_capacity, batchtopk_pool, matryoshka_widths, matryoshka_selection)
        self.variant = variants.resolve_variant(architecture, k, n_latents, *options)
        self.architecture = architecture
        config = getattr(self, "_hub_mixin_config", None)
        for name, default in VARIANT_DEFAULTS.items():
            if isinstance(config, dict) and name in config and config[name] == default:
                del config[name]  # a TopK model's config keeps exactly its published keys

        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.decoder = latent_major_linear(n_latents, n_inputs)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self._dead_indices: Tensor | None = None
        if self.variant.batchtopk:
            self.register_buffer("batchtopk_threshold", torch.zeros((), dtype=torch.float64))

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

    @torch.no_grad()
    def update_batchtopk_threshold(self, minimum: Float[Tensor, ""]) -> None:
        """One optimizer step's update of the threshold, as SAELens: `t <- 0.99 t + 0.01 m`
        for `m` the step's smallest positive kept activation (+inf: no update)."""
        t = self.batchtopk_threshold
        m = minimum.to(t)
        rate = variants.THRESHOLD_RATE
        t.copy_(torch.where(torch.isfinite(m), (1 - rate) * t + rate * m, t))

    def _apply(self, fn, recurse=True):
        # A cast of the model (.half(), Lightning's 16-true) keeps the threshold float64.
        threshold = self._buffers.get("batchtopk_threshold")
        module = super()._apply(fn, recurse)
        moved = self._buffers.get("batchtopk_threshold")
        if threshold is not None and moved is not None and moved.dtype != torch.float64:
            self._buffers["batchtopk_threshold"] = threshold.to(moved.device)
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._dead_indices = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dead_fraction(self) -> Tensor:
        return self.dead_mask.float().mean()

    # The maths ------------------------------------------------------------------

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

    def _backend(self, inputs: Tensor) -> str:
        capacity = self.variant.capacity
        return sparse.resolve_backend(inputs.device, capacity, self.n_latents, self.backend)

    def _select(
        self, inputs_std: Tensor, backend: str, k: int | None = None
    ) -> tuple[TopK, TopK | None]:
        """The top-k (default k: `self.k`) of `W_enc (inputs_std - b)` and AuxK's
        selection, before ReLU."""
        flat = inputs_std.reshape(-1, self.n_inputs)
        dead = self.dead_latent_indices() if self.auxk is not None else None
        topk, auxk = sparse.encode(
            flat, self.encoder.weight, k or self.k, self.auxk, dead, self.pre_encoder_bias, backend
        )
        topk = _unflatten(topk, inputs_std)
        return topk, None if self.auxk is None else _unflatten(auxk, inputs_std)

    def _select_variant(
        self, inputs_std: Tensor, backend: str, mask: Tensor | None
    ) -> tuple[TopK, TopK | None]:
        """Another architecture's selection (values after ReLU, `capacity` per vector,
        zeros where not kept) and AuxK's (before ReLU): BatchTopK among the candidates
        in training, JumpReLU at `batchtopk_threshold` at inference (with more entries
        per vector where some vector has more latents above it), or TopK."""
        topk, auxk = self._select(inputs_std, backend, self.variant.capacity)
        if not self.variant.batchtopk:
            return TopK(torch.relu(topk.values), topk.indices), auxk
        if self.training:
            selected = variants.batchtopk(topk, self.k, mask, self.variant.pool, self.n_latents)
            return selected, auxk
        capacity = self.variant.capacity
        selected = variants.jumprelu(topk, self.batchtopk_threshold)
        # JumpReLU keeps every latent above the threshold: where a vector kept all its
        # candidates, there may be more, so look at twice as many.
        while (
            capacity < self.n_latents
            and variants.capped_vectors(selected.values, self.n_latents)[0]
        ):
            capacity = min(2 * capacity, self.n_latents)
            topk, auxk = self._select(inputs_std, backend, capacity)
            selected = variants.jumprelu(topk, self.batchtopk_threshold)
        return selected, auxk

    def _decode_latents(self, topk: TopK, backend: str | None = None) -> Tensor:
        """`W_dec topk` (no bias)."""
        if topk.values.shape[-1] == 0:
            return topk.values.new_zeros((*topk.values.shape[:-1], self.n_inputs))
        return sparse.decode(topk, self.decoder.weight, backend or self.backend)

    def encode(
        self, inputs: Float[Tensor, "... n_inputs"], mask: Tensor | None = None
    ) -> EncoderOutput:
        """Standardise, subtract the pre-encoder bias, encode, keep the k largest.

        The values are pre-activations, before ReLU. For BatchTopK (in training, among the
        vectors where `mask`, broadcast to the leading shape, is True), JumpReLU (at
        inference) or Matryoshka, `capacity` entries per vector: the kept pre-activations
        (all positive) and zeros where not kept (docs/variants.md).
        """
        self._check_inputs(inputs)
        inputs_std, stats = self._standardize(inputs)
        backend = self._backend(inputs_std)
        if self.variant.architecture != "topk":
            topk, auxk = self._select_variant(inputs_std, backend, mask)
            return EncoderOutput(topk, auxk, stats, self._dead_fraction())
        topk, auxk = self._select(inputs_std, backend)
        return EncoderOutput(topk, auxk, stats, self._dead_fraction())

    def decode(self, topk: TopK, stats: Stats | None = None) -> Float[Tensor, "... n_inputs"]:
        """`sum_i value_i * decoder column index_i + pre_encoder_bias`, un-standardised
        when `stats` are given."""
        recons = self._decode_latents(topk) + self.pre_encoder_bias
        return recons if stats is None else unstandardize(recons, stats)

    def forward_standardized(
        self, inputs: Float[Tensor, "... n_inputs"], mask: Tensor | None = None
    ) -> StandardizedOutput:
        """`forward`, also returning the standardised inputs and reconstructions."""
        self._check_inputs(inputs)
        inputs_std, stats = self._standardize(inputs)
        backend = self._backend(inputs_std)
        topk_only = self.variant.architecture == "topk"
        if topk_only and backend in sparse.FUSED_BACKENDS and inputs_std.numel() > 0:
            topk, auxk, decoded, auxk_recons = self._autoencode_fused(inputs_std, backend)
        else:
            if topk_only:
                topk, auxk = self._select(inputs_std, backend)
                topk = TopK(torch.relu(topk.values), topk.indices)
            else:
                topk, auxk = self._select_variant(inputs_std, backend, mask)
            decoded = self._decode_latents(topk, backend)
            auxk_recons = None
            if auxk is not None:
                auxk = TopK(torch.relu(auxk.values), auxk.indices)
                auxk_recons = self._decode_latents(auxk, backend)
        recons_std = decoded + self.pre_encoder_bias
        recons = recons_std if stats is None else unstandardize(recons_std, stats)
        output = AutoencoderOutput(topk, recons, auxk, auxk_recons, self._dead_fraction())
        prefixes = []
        for width in self.variant.widths[:-1]:  # Matryoshka's (the last is the full width)
            prefix = variants.prefix_topk(topk, width)
            prefix_std = self._decode_latents(prefix, backend) + self.pre_encoder_bias
            prefixes.append(prefix_std if stats is None else unstandardize(prefix_std, stats))
        prefix_recons = (*prefixes, recons) if self.variant.widths else ()
        return StandardizedOutput(output, inputs_std, recons_std, prefix_recons)

    def _autoencode_fused(
        self, inputs_std: Tensor, backend: str
    ) -> tuple[TopK, TopK | None, Tensor, Tensor | None]:
        """`_select`, ReLU and both decodes as one autograd function (`mlsae.sparse`)."""
        dead = self.dead_latent_indices() if self.auxk is not None else None
        fused = sparse.autoencode(
            inputs_std.reshape(-1, self.n_inputs),
            self.pre_encoder_bias,
            self.encoder.weight,
            self.decoder.weight,
            self.k,
            self.auxk,
            dead,
            backend,
        )
        topk = _unflatten(fused.topk, inputs_std)
        decoded = fused.decoded.reshape(inputs_std.shape)
        if self.auxk is None:
            return topk, None, decoded, None
        auxk = _unflatten(fused.auxk, inputs_std)
        return topk, auxk, decoded, fused.auxk_decoded.reshape(inputs_std.shape)

    def forward(
        self, inputs: Float[Tensor, "... n_inputs"], mask: Tensor | None = None
    ) -> AutoencoderOutput:
        """Encode, ReLU the k largest, decode. See `AutoencoderOutput` (`mask`: the vectors
        that count in a BatchTopK selection, see `encode`)."""
        return self.forward_standardized(inputs, mask).output


def _unflatten(topk: TopK, like: Tensor) -> TopK:
    """A `[vectors, k]` selection with the leading shape of `like`."""
    return TopK(*(t.reshape(*like.shape[:-1], t.shape[-1]) for t in topk))
