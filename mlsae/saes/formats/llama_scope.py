"""Llama Scope, and any SAE saved by OpenMOSS `lm_saes` 1.0: a folder with
`hyperparams.json` (lm_saes' `SAEConfig`) and `checkpoints/final.safetensors` holding
`encoder.weight [d_sae, d_model]`, `encoder.bias`, `decoder.weight [d_model, d_sae]` and
`decoder.bias`, as trained: on inputs scaled to an average norm of sqrt(d_model).

The SAE is the one `SparseAutoEncoder.from_pretrained` of lm_saes 1.0 builds (tag v1.0.0,
commit a05e45a, src/lm_saes/sae.py `from_config`), which rewrites the weights so that raw
activations go in and come out and each latent's decoder direction has unit norm:

- `norm_activation = "dataset-wise"`: with `s = sqrt(d_model) / average_norm` for the input
  (`in`) and output (`out`) sites, `b_enc / s_in`, `W_dec * s_in / s_out`, `b_dec / s_out`;
- `sparsity_include_decoder_norm`: decoder columns divided by their norms, encoder rows and
  biases multiplied by them;
- `act_fn = "jumprelu"`: a latent is kept where its rewritten pre-activation exceeds the one
  scalar `jump_relu_threshold`; `"topk"`: the `top_k` largest are kept, whatever the
  threshold (lm_saes 1.0 announces a conversion to JumpReLU that its SAE does not apply);
- `apply_decoder_bias_to_pre_encoder`: the (rewritten) decoder bias is subtracted from the
  input;
- a transcoder reads `hook_point_in` and predicts `hook_point_out`.

Latents are therefore on the scale lm_saes reports them. `norm_activation =
"token-wise"` scales each input to norm sqrt(d_model) and the reconstruction back, as
lm_saes' `compute_loss` reports it. The layer and site come from the TransformerLens hook
names (`blocks.15.hook_resid_post`; a Llama Scope transcoder reads
`blocks.L.ln2.hook_normalized` and predicts `blocks.L.hook_mlp_out`), unless
`layer=`/`site=`/`output_site=` say otherwise.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from mlsae.saes.base import SAE
from mlsae.saes.linear import Activation, LinearSAE, Normalisation
from mlsae.saes.registry import Format, SAEFileError, register

CONFIG = "hyperparams.json"

CHECKPOINTS = (
    "sae_weights.safetensors",
    "sae_weights.pt",
    "checkpoints/pruned.safetensors",
    "checkpoints/pruned.pt",
    "checkpoints/final.safetensors",
    "checkpoints/final.pt",
)
"""Where lm_saes 1.0 looks for the weights in an SAE's folder, first found first."""

SITE_OF_HOOK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "ln2.hook_normalized": "mlp_in",
    "attn.hook_z": "attn_z",
}
NORMALISATIONS = ("dataset-wise", "token-wise", "none", "inference")
ACTIVATIONS = ("relu", "jumprelu", "topk")
KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Hyperparams:
    """The fields of lm_saes 1.0's `SAEConfig` that change inference, with its defaults."""

    d_model: int
    d_sae: int
    hook_point_in: str
    hook_point_out: str
    act_fn: str
    jump_relu_threshold: float
    top_k: int
    norm_activation: str
    norm_in: float | None
    norm_out: float | None
    use_decoder_bias: bool
    apply_decoder_bias_to_pre_encoder: bool
    sparsity_include_decoder_norm: bool

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out


def read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{file} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise SAEFileError(f"{file} holds no JSON object of hyperparameters")
    return config


def field(file: Path, config: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """`config[name]` (`default` where absent or null), checked to be a `kind`."""
    value = config.get(name)
    if value is None:
        return default
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
        raise SAEFileError(f"{file}: {name} is {value!r}, not {KIND_NAMES[kind]}")
    return value


def average_norms(file: Path, config: dict[str, Any], transcoder: bool) -> tuple[float, float]:
    """The `in` and `out` average activation norms that dataset-wise normalisation needs
    (an autoencoder's `out` is its `in` where the file gives only one)."""
    norms = config.get("dataset_average_activation_norm")
    if not isinstance(norms, dict) or "in" not in norms:
        raise SAEFileError(
            f"{file}: norm_activation is dataset-wise but dataset_average_activation_norm "
            f"gives no 'in' norm ({norms!r})"
        )
    if transcoder and "out" not in norms:
        raise SAEFileError(f"{file}: a transcoder's dataset_average_activation_norm needs 'out'")
    norm_in, norm_out = norms["in"], norms.get("out", norms["in"])
    for name, norm in (("in", norm_in), ("out", norm_out)):
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0:
            raise SAEFileError(
                f"{file}: dataset_average_activation_norm[{name!r}] is {norm!r}, not a "
                "positive number"
            )
    return float(norm_in), float(norm_out)


def parse_hyperparams(file: Path) -> Hyperparams:
    """The hyperparameters of `file`, refusing those that lm_saes 1.0 cannot run or that
    this loader does not reproduce."""
    config = read_config(file)
    d_model = field(file, config, "d_model", int, 768)
    expansion = field(file, config, "expansion_factor", int, 128)
    hook_in = field(file, config, "hook_point_in", str, "blocks.0.hook_resid_pre")
    hook_out = field(file, config, "hook_point_out", str, hook_in)
    act_fn = field(file, config, "act_fn", str, "relu")
    norm = field(file, config, "norm_activation", str, "token-wise")
    if act_fn.lower() not in ACTIVATIONS:
        raise SAEFileError(f"{file}: act_fn {act_fn!r} is none of {', '.join(ACTIVATIONS)}")
    if norm not in NORMALISATIONS:
        raise SAEFileError(
            f"{file}: norm_activation {norm!r} is not supported (expected one of "
            f"{', '.join(NORMALISATIONS)}; batch-wise makes each output depend on its batch)"
        )
    if field(file, config, "use_glu_encoder", bool, False):
        raise SAEFileError(f"{file}: SAEs with use_glu_encoder are not supported")
    if norm == "token-wise" and hook_in != hook_out:
        raise SAEFileError(
            f"{file}: a token-wise normalised transcoder's output scale depends on the "
            "activations it predicts, so it cannot be run on its inputs alone"
        )
    norm_in, norm_out = (
        average_norms(file, config, hook_in != hook_out) if norm == "dataset-wise" else (None,) * 2
    )
    return Hyperparams(
        d_model=d_model,
        d_sae=field(file, config, "d_sae", int, d_model * expansion),
        hook_point_in=hook_in,
        hook_point_out=hook_out,
        act_fn=act_fn,
        jump_relu_threshold=float(field(file, config, "jump_relu_threshold", float, 0.0)),
        top_k=field(file, config, "top_k", int, 50),
        norm_activation=norm,
        norm_in=norm_in,
        norm_out=norm_out,
        use_decoder_bias=field(file, config, "use_decoder_bias", bool, True),
        apply_decoder_bias_to_pre_encoder=field(
            file, config, "apply_decoder_bias_to_pre_encoder", bool, True
        ),
        sparsity_include_decoder_norm=field(
            file, config, "sparsity_include_decoder_norm", bool, True
        ),
    )


def checkpoint_of(folder: Path) -> Path:
    for name in CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    raise SAEFileError(
        f"{folder} holds {CONFIG} but no weights (looked for {', '.join(CHECKPOINTS)})"
    )


def read_weights(file: Path) -> dict[str, Tensor]:
    """The state dict of a `.safetensors` file, or of a `.pt` file's `sae` entry (read as
    data only, never unpickled)."""
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = state.get("sae") if isinstance(state, dict) else None
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same mistake)
        detail = str(error).splitlines()[0] if str(error) else "no detail"
        raise SAEFileError(f"{file} is not a readable lm_saes checkpoint ({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SAEFileError(f"{file} holds no lm_saes state dict of tensors")
    return state


def checked_weights(file: Path, state: dict[str, Tensor], hp: Hyperparams) -> dict[str, Tensor]:
    """The four tensors as stored (a zero decoder bias where the SAE has none), after
    checking their names, shapes and types against the hyperparameters."""
    expected = {
        "encoder.weight": (hp.d_sae, hp.d_model),
        "encoder.bias": (hp.d_sae,),
        "decoder.weight": (hp.d_model, hp.d_sae),
    }
    if hp.use_decoder_bias:
        expected["decoder.bias"] = (hp.d_model,)
    missing = [name for name in expected if name not in state]
    if missing:
        raise SAEFileError(f"{file} lacks {', '.join(missing)} (found {', '.join(sorted(state))})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise SAEFileError(
                f"{file}: {name} has shape {list(state[name].shape)}, but d_model "
                f"{hp.d_model} and d_sae {hp.d_sae} need {list(shape)}"
            )
        if not state[name].is_floating_point():
            raise SAEFileError(f"{file}: {name} holds {state[name].dtype}, not floats")
    weights = {name: state[name] for name in expected}
    weights.setdefault("decoder.bias", weights["decoder.weight"].new_zeros(hp.d_model))
    return weights


def fold_dataset_norms(w: dict[str, Tensor], hp: Hyperparams) -> dict[str, Tensor]:
    """lm_saes 1.0 `standardize_parameters_of_dataset_activation_scaling`: the scaling of
    inputs to norm sqrt(d_model), and of outputs back, moved into the weights."""
    assert hp.norm_in is not None and hp.norm_out is not None
    scale_in = math.sqrt(hp.d_model) / hp.norm_in
    scale_out = math.sqrt(hp.d_model) / hp.norm_out
    return {
        "encoder.weight": w["encoder.weight"],
        "encoder.bias": w["encoder.bias"] / scale_in,
        "decoder.weight": w["decoder.weight"] * scale_in / scale_out,
        "decoder.bias": w["decoder.bias"] / scale_out,
    }


def to_unit_decoder_norm(w: dict[str, Tensor]) -> dict[str, Tensor]:
    """lm_saes 1.0 `transform_to_unit_decoder_norm`: each latent's decoder column to norm 1,
    its encoder row and bias scaled up by the same factor (the latent grows by it)."""
    norms = w["decoder.weight"].norm(p=2, dim=0)
    return {
        "encoder.weight": w["encoder.weight"] * norms[:, None],
        "encoder.bias": w["encoder.bias"] * norms,
        "decoder.weight": w["decoder.weight"] / norms,
        "decoder.bias": w["decoder.bias"],
    }


class TokenwiseNorm:
    """Each vector scaled to norm sqrt(d_model), its reconstruction scaled back by the same
    factor (lm_saes 1.0 `compute_norm_factor`, "token-wise")."""

    def __init__(self, d_model: int) -> None:
        self.target = math.sqrt(d_model)

    def normalise(self, x: Tensor) -> tuple[Tensor, Any]:
        factor = self.target / x.norm(p=2, dim=-1, keepdim=True)
        return x * factor, factor

    def restore(self, y: Tensor, state: Any) -> Tensor:
        return y / state

    def __repr__(self) -> str:
        return f"TokenwiseNorm({self.target**2:g})"


def activation_of(file: Path, hp: Hyperparams) -> tuple[Activation, dict[str, Any]]:
    """The activation and its LinearSAE arguments, from `act_fn.lower()` as lm_saes 1.0's
    `activation_function_factory` picks it. Its `from_config` says it converts a top-k SAE
    with a positive `jump_relu_threshold` to JumpReLU, but only rewrites `cfg.act_fn` after
    the activation function is built: the SAE it returns still keeps the top k."""
    act_fn = hp.act_fn.lower()
    if act_fn == "topk":
        if not 0 < hp.top_k <= hp.d_sae:
            raise SAEFileError(f"{file}: top_k {hp.top_k} is not in 1..d_sae ({hp.d_sae})")
        return "topk", {"k": hp.top_k}
    if act_fn == "jumprelu":
        if hp.jump_relu_threshold < 0:
            # lm_saes keeps negative pre-activations above a negative threshold; LinearSAE
            # never does.
            raise SAEFileError(f"{file}: a negative jump_relu_threshold is not supported")
        return "jumprelu", {"threshold": torch.full((hp.d_sae,), hp.jump_relu_threshold)}
    return "relu", {}


def site_of_hook(hook: str) -> tuple[int | None, str | None]:
    """The layer and site of a TransformerLens hook name; (None, None) when unknown."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if match is None or match.group(2) not in SITE_OF_HOOK:
        return None, None
    return int(match.group(1)), SITE_OF_HOOK[match.group(2)]


def where_it_reads(file: Path, hp: Hyperparams, options: dict[str, Any]) -> dict[str, Any]:
    """`layer`, `site` and `output_site` from the hook names, the options taking over."""
    layer, site = site_of_hook(hp.hook_point_in)
    output_site = site_of_hook(hp.hook_point_out)[1] if hp.is_transcoder else None
    where = {"layer": layer, "site": site, "output_site": output_site}
    where.update({name: value for name, value in options.items() if value is not None})
    unknown = [
        f"{hook} ({name})"
        for name, hook in (("site", hp.hook_point_in), ("output_site", hp.hook_point_out))
        if where[name] is None and (name == "site" or hp.is_transcoder)
    ]
    if unknown or where["layer"] is None:
        raise SAEFileError(
            f"{file}: unknown hook point {', '.join(unknown) or hp.hook_point_in}; pass "
            "layer= and site= (and output_site= for a transcoder)"
        )
    return where


def config_of(path: Path) -> Path:
    """The `hyperparams.json` of `path`: an SAE's folder, that file, or a checkpoint file in
    the folder or its `checkpoints/`."""
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise SAEFileError(f"{path} holds no {CONFIG}")
        return path / CONFIG
    if path.name == CONFIG:
        return path
    for folder in (path.parent, path.parent.parent):
        if (folder / CONFIG).is_file():
            return folder / CONFIG
    raise SAEFileError(f"{path}: no {CONFIG} beside it or in the folder above")


def load(
    path: Path,
    layer: int | None = None,
    site: str | None = None,
    output_site: str | None = None,
) -> SAE:
    """The lm_saes 1.0 SAE (or transcoder) of `path`, as its `from_pretrained` runs it."""
    config_file = config_of(path)
    hp = parse_hyperparams(config_file)
    weights_file = (
        path if path != config_file and path.is_file() else checkpoint_of(config_file.parent)
    )
    where = where_it_reads(
        config_file, hp, {"layer": layer, "site": site, "output_site": output_site}
    )
    weights = checked_weights(weights_file, read_weights(weights_file), hp)
    # Rewritten in the stored dtype (bfloat16 for Llama Scope), as lm_saes does before
    # loading the state dict: its thresholds were calibrated on the rounded weights.
    normalisation: Normalisation | None = None
    if hp.norm_activation == "dataset-wise":
        weights = fold_dataset_norms(weights, hp)
    elif hp.norm_activation == "token-wise":
        normalisation = TokenwiseNorm(hp.d_model)
    if hp.sparsity_include_decoder_norm:
        weights = to_unit_decoder_norm(weights)
    weights = {name: tensor.float() for name, tensor in weights.items()}
    activation, activation_args = activation_of(config_file, hp)
    sae = LinearSAE(
        weights["encoder.weight"].T.contiguous(),
        weights["encoder.bias"],
        weights["decoder.weight"].T.contiguous(),
        weights["decoder.bias"],
        activation=activation,
        subtract_decoder_bias=hp.use_decoder_bias and hp.apply_decoder_bias_to_pre_encoder,
        normalisation=normalisation,
        **activation_args,
        **where,
    )
    sae.format = "llama_scope"
    return sae


register(Format("llama_scope", marks=(CONFIG,), load=load))
