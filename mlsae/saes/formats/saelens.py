"""SAELens: a folder with `cfg.json` (read by `saelens_config`) and
`sae_weights.safetensors` holding `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_out]`,
`b_dec`, a JumpReLU `threshold` per latent and a skip transcoder's `W_skip [d_out, d_in]`;
`sparsity.safetensors` beside them is not needed. The maths is SAELens 6's (sae_lens/saes/):

- `standard`: `relu(pre)`; `topk`: the k largest pre-activations, then ReLU; `jumprelu`
  (also how BatchTopK and Matryoshka SAEs are saved): `relu(pre) * (pre > threshold)`;
  `pre = (normalise(x) - b_dec?) @ W_enc + b_enc`, `b_dec` subtracted when
  `apply_b_dec_to_input`, and `decode(acts) = restore(acts @ W_dec + b_dec)`.
- `rescale_acts_by_decoder_norm` (topk): SAELens multiplies the pre-activations by the
  decoder row norms before the top-k and divides the latents by them before decoding;
  folding the norms into `W_enc`, `b_enc` and `W_dec` gives the same latents and output.
- `normalize_activations`: `layer_norm` centres each vector and divides it by its unbiased
  standard deviation plus 1e-5, and the output is multiplied by that deviation (without the
  1e-5) and re-centred; `constant_norm_rescale` scales each vector to norm `sqrt(d_in)` and
  the output back; `expected_average_only_in` multiplies inputs by the release's
  `norm_scaling_factor` (the `norm_scaling_factor=` option) and divides outputs by it, as
  SAELens' `from_pretrained` folds it, and without that option uses inputs unscaled, as its
  `load_from_disk` does.
- Transcoders (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
  `jumprelu_skip_transcoder`) never subtract `b_dec`, normalise their input without
  restoring their output (a scaling factor is still undone on the output, as folding it
  does), and a skip transcoder's forward adds `x @ W_skip.T` of the raw input.

The layer and site come from the config's hook names unless `layer=`/`site=` (a
transcoder's `output_site=`) are given. An `attn_z` SAE takes the heads concatenated,
`[..., n_heads * d_head]`, where SAELens (`reshape_activations: hook_z`) takes
`[..., n_heads, d_head]`. Weights are read as float32 whatever the config's `dtype`
(`load_sae(dtype=)` casts them).
"""

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mlsae.saes.base import SAE
from mlsae.saes.formats.saelens_config import CONFIG, SAELensConfig, location, read_config
from mlsae.saes.linear import (
    Activation,
    ConstantScale,
    LinearSAE,
    NoNormalisation,
    Normalisation,
)
from mlsae.saes.registry import Format, SAEFileError, register

WEIGHTS = "sae_weights.safetensors"
LAYER_NORM_EPS = 1e-5


class LayerNormalisation:
    """SAELens' `layer_norm`: each vector centred and divided by its unbiased standard
    deviation plus 1e-5; the output multiplied by that deviation and re-centred."""

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + LAYER_NORM_EPS), (mean, std)

    def restore(self, y: Tensor, state: Any) -> Tensor:
        mean, std = state
        return y * std + mean

    def __repr__(self) -> str:
        return "LayerNormalisation()"


class NormRescale:
    """SAELens' `constant_norm_rescale`: each vector scaled to norm `sqrt(d_in)`, the
    output scaled back."""

    def __init__(self, d_in: int) -> None:
        self.d_in = d_in

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        coefficient = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
        return x * coefficient, coefficient

    def restore(self, y: Tensor, state: Any) -> Tensor:
        return y / state

    def __repr__(self) -> str:
        return f"NormRescale({self.d_in})"


class InputOnly:
    """A normalisation of the input whose output is left as it is (SAELens' transcoders)."""

    def __init__(self, inner: Normalisation) -> None:
        self.inner = inner

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.inner.normalise(x)

    def restore(self, y: Tensor, state: Any) -> Tensor:
        return y

    def __repr__(self) -> str:
        return f"InputOnly({self.inner!r})"


def required_tensors(config: SAELensConfig) -> dict[str, tuple[int, ...] | None]:
    """The tensors the architecture needs and their shapes (None: from W_dec)."""
    d_in, d_sae = config.d_in, config.d_sae
    shapes: dict[str, tuple[int, ...] | None] = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": None,
        "b_dec": None,
    }
    if config.architecture.startswith("jumprelu"):
        shapes["threshold"] = (d_sae,)
    if config.architecture.endswith("skip_transcoder"):
        shapes["W_skip"] = None
    return shapes


def read_weights(file: Path, config: SAELensConfig) -> dict[str, Tensor]:
    """The tensors of `file` as float32, checked against `config`."""
    try:
        state = load_file(file)
    except FileNotFoundError:
        raise SAEFileError(f"{file} is missing: an SAELens SAE needs its weights") from None
    except (SafetensorError, OSError) as error:
        raise SAEFileError(f"{file} is not a readable safetensors file ({error})") from None
    if "threshold" not in state and "log_threshold" in state:
        # Older JumpReLU checkpoints (SAELens' JumpReLUTrainingSAE converts them so).
        state["threshold"] = state.pop("log_threshold").float().exp()
    check_scaling_factor(file, state)
    missing = [name for name in required_tensors(config) if name not in state]
    if missing:
        raise SAEFileError(
            f"{file} lacks {', '.join(missing)} for a {config.architecture} SAE (found "
            f"{', '.join(sorted(state)[:8]) or 'nothing'})"
        )
    tensors = {name: state[name].float() for name in required_tensors(config)}
    check_shapes(file, config, tensors)
    return tensors


def check_scaling_factor(file: Path, state: dict[str, Tensor]) -> None:
    """SAELens drops a `scaling_factor` of ones and loads no SAE with any other."""
    factor = state.pop("scaling_factor", None)
    if factor is not None and not torch.allclose(factor.float(), torch.ones_like(factor.float())):
        raise SAEFileError(
            f"{file} holds a fine-tuning scaling_factor other than ones, which SAELens 6 "
            "does not load and neither does load_sae"
        )


def check_shapes(file: Path, config: SAELensConfig, tensors: dict[str, Tensor]) -> None:
    W_dec = tensors["W_dec"]
    if W_dec.ndim != 2 or W_dec.shape[0] != config.d_sae:
        raise SAEFileError(
            f"{file}: W_dec has shape {tuple(W_dec.shape)}, but d_sae {config.d_sae} needs "
            f"[{config.d_sae}, d_out]"
        )
    d_out = W_dec.shape[1]
    wanted_out = config.d_out if config.is_transcoder else config.d_in
    if wanted_out is not None and d_out != wanted_out:
        raise SAEFileError(
            f"{file}: W_dec has shape {tuple(W_dec.shape)}, but {CONFIG} says "
            f"[{config.d_sae}, {wanted_out}]"
        )
    shapes = required_tensors(config)
    shapes.update(b_dec=(d_out,))
    if "W_skip" in shapes:
        shapes["W_skip"] = (d_out, config.d_in)
    for name, shape in shapes.items():
        if shape is not None and tuple(tensors[name].shape) != shape:
            raise SAEFileError(
                f"{file}: {name} has shape {tuple(tensors[name].shape)}, but {CONFIG} "
                f"(d_in {config.d_in}, d_sae {config.d_sae}) needs {list(shape)}"
            )


def fold_decoder_norms(tensors: dict[str, Tensor]) -> None:
    """`rescale_acts_by_decoder_norm` folded into the weights (SAELens' `fold_W_dec_norm`,
    without its clamp, as its top-k uses the norms unclamped)."""
    norms = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


def activation_of(config: SAELensConfig) -> Activation:
    if config.architecture.startswith("jumprelu"):
        return "jumprelu"
    return "topk" if config.architecture == "topk" else "relu"


def normalisation_of(config: SAELensConfig, norm_scaling_factor: float | None) -> Normalisation:
    name = config.normalize_activations
    if norm_scaling_factor is not None and name != "expected_average_only_in":
        raise SAEFileError(
            f"{config.file}: norm_scaling_factor= applies only to an SAE whose "
            f"normalize_activations is expected_average_only_in, not {name}"
        )
    if name == "expected_average_only_in":
        if norm_scaling_factor is None:
            warnings.warn(
                f"{config.file} expects inputs scaled by its release's norm_scaling_factor, "
                "which was not given (norm_scaling_factor=), so inputs are used unscaled as "
                "SAELens' load_from_disk does.",
                stacklevel=4,
            )
            return NoNormalisation()
        return ConstantScale(norm_scaling_factor)
    if name == "none":
        return NoNormalisation()
    inner = LayerNormalisation() if name == "layer_norm" else NormRescale(config.d_in)
    return InputOnly(inner) if config.is_transcoder else inner


def load(
    path: Path,
    layer: int | None = None,
    site: str | None = None,
    output_site: str | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    folder = path if path.is_dir() else path.parent
    config = read_config(folder / CONFIG)
    tensors = read_weights(folder / WEIGHTS, config)
    where = location(config, layer, site, output_site)
    normalisation = normalisation_of(config, norm_scaling_factor)
    if config.architecture == "topk" and config.rescale_acts_by_decoder_norm:
        fold_decoder_norms(tensors)
    W_skip = tensors.get("W_skip")
    sae = LinearSAE(
        tensors["W_enc"],
        tensors["b_enc"],
        tensors["W_dec"],
        tensors["b_dec"],
        activation=activation_of(config),
        k=config.k,
        threshold=tensors.get("threshold"),
        subtract_decoder_bias=config.apply_b_dec_to_input and not config.is_transcoder,
        normalisation=normalisation,
        W_skip=None if W_skip is None else W_skip.T.contiguous(),
        **where,
    )
    sae.format = "saelens"
    sae.activation_source = config.activation_source
    return sae


register(Format("saelens", marks=(CONFIG, WEIGHTS), load=load))
