"""The `cfg.json` of an SAELens SAE, in both of its layouts, and where the SAE reads.

SAELens 6 writes `architecture`, `d_in`, `d_sae`, `apply_b_dec_to_input`,
`normalize_activations`, the architecture's own fields (`k`,
`rescale_acts_by_decoder_norm`, a transcoder's `d_out`) and a `metadata` object holding
`hook_name` (a transcoder's `hook_name_out`) and `sae_lens_version`. Earlier versions wrote
one flat object (`hook_name` or `hook_point`, `hook_layer`, `activation_fn_str` or
`activation_fn`, `activation_fn_kwargs` with a top-k SAE's `k`); SAELens reads a config as
flat when no `sae_lens_version` below `6` says otherwise (`handle_config_defaulting` in
sae_lens/loading/pretrained_sae_loaders.py), and so does this module.

Hook names are TransformerLens names (`blocks.5.hook_resid_pre`, `blocks.5.attn.hook_z`,
`blocks.5.ln2.hook_normalized`, ...), TransformerLens 3 bridge names (`blocks.5.hook_out`,
`blocks.5.mlp.hook_in`, ...) or, in `hf_hook_name`, Hugging Face module paths
(`model.layers.5`, `model.layers.5.mlp`, `model.layers.5.self_attn.o_proj.input`, ...).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae.lm.transformer_lens import TransformerLensOptions
from mlsae.saes.registry import SAEFileError

CONFIG = "cfg.json"

TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
ARCHITECTURES = ("standard", "topk", "jumprelu", *TRANSCODERS)
NORMALISATIONS = ("none", "layer_norm", "constant_norm_rescale", "expected_average_only_in")

TL_SITES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "attn_z",
    "ln2.hook_normalized": "mlp_in",
    # TransformerLens 3 bridge names (its block's hook aliases), over the unprocessed
    # Hugging Face model
    "hook_in": "resid_pre",
    "hook_out": "resid_post",
    "attn.hook_out": "attn_out",
    "mlp.hook_out": "mlp_out",
    "mlp.hook_in": "mlp_in",
    "ln2.hook_out": "mlp_in",
    "attn.o.hook_in": "attn_z",
}
"""Site of each TransformerLens hook after `blocks.<L>.`. `hook_mlp_in` is absent on
purpose: TransformerLens gives it the un-normalised residual stream, which has no site."""

HOOKED_TRANSFORMER_SITES = (
    "hook_resid_pre",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "attn.hook_z",
    "ln2.hook_normalized",
)
"""The hooks of a TransformerLens 2 `HookedTransformer`, whose weights TransformerLens may
have processed."""

HF_SITES = {
    "": "resid_post",
    ".output": "resid_post",
    ".input": "resid_pre",
    ".mlp": "mlp_out",
    ".mlp.output": "mlp_out",
    ".post_feedforward_layernorm.output": "mlp_out",
    ".mlp.input": "mlp_in",
    ".pre_feedforward_layernorm.output": "mlp_in",
    ".self_attn": "attn_out",
    ".self_attn.output": "attn_out",
    ".attn": "attn_out",
    ".attention": "attn_out",
    ".self_attn.o_proj.input": "attn_z",
}
"""Site of each Hugging Face module path after `<prefix>.layers.<L>` (or `.h.<L>`)."""

TL_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
HF_HOOK = re.compile(r"(?:[A-Za-z_]+\.)*(?:layers|h)\.(\d+)(.*)")


@dataclass(frozen=True)
class SAELensConfig:
    """What the maths and the location of an SAELens SAE need from its `cfg.json`."""

    file: Path
    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None
    k: int | None
    rescale_acts_by_decoder_norm: bool
    apply_b_dec_to_input: bool
    normalize_activations: str
    hooks: tuple[str, ...]
    """The input hook names the config gives (TransformerLens first, then Hugging Face)."""
    hooks_out: tuple[str, ...]
    """A transcoder's output hook names, likewise."""
    hook_layer: int | None
    hook_head_index: int | None
    activation_source: TransformerLensOptions | None
    """How TransformerLens processed the model the SAE read, or None for Hugging Face's."""

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS


def read_config(file: Path) -> SAELensConfig:
    """The config of `file`; SAEFileError when it is unreadable or not an SAE SAELens'
    `SAE.load_from_disk` would build into one of the architectures read here."""
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise SAEFileError(f"{file} is missing: an SAELens SAE needs its cfg.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{file} is not a readable JSON config ({error})") from None
    if not isinstance(raw, dict):
        raise SAEFileError(f"{file} holds no JSON object")
    cfg = flat_to_current(raw) if is_flat(raw) else dict(raw)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return SAELensConfig(
        file=file,
        architecture=architecture(file, cfg),
        d_in=positive_int(file, cfg, "d_in"),
        d_sae=positive_int(file, cfg, "d_sae"),
        d_out=positive_int(file, cfg, "d_out") if "d_out" in cfg else None,
        k=top_k(file, cfg),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=normalisation(file, cfg),
        hooks=names(metadata, cfg, "hook_name", "hf_hook_name"),
        hooks_out=names(metadata, cfg, "hook_name_out", "hf_hook_name_out"),
        hook_layer=optional_int(cfg.get("hook_layer")),
        hook_head_index=optional_int(metadata.get("hook_head_index", cfg.get("hook_head_index"))),
        activation_source=activation_source(metadata, cfg),
    )


def activation_source(
    metadata: dict[str, Any], cfg: dict[str, Any]
) -> TransformerLensOptions | None:
    """The TransformerLens processing of the activations the SAE read, as SAELens loads its
    model (`load_model`): `HookedTransformer.from_pretrained_no_processing` with the
    config's `model_from_pretrained_kwargs`, where the SAE reads a `HookedTransformer` hook
    (`blocks.<L>.hook_resid_pre`, ...). None where it reads a Hugging Face module or a
    TransformerLens 3 bridge hook, which see the Hugging Face model's own activations."""
    model_class = metadata.get("model_class_name", cfg.get("model_class_name"))
    if model_class not in (None, "HookedTransformer"):
        return None
    hooks = names(metadata, cfg, "hook_name")
    if not hooks or (match := TL_HOOK.fullmatch(hooks[0])) is None:
        return None
    if match.group(2) not in HOOKED_TRANSFORMER_SITES:
        return None
    kwargs = metadata.get("model_from_pretrained_kwargs", cfg.get("model_from_pretrained_kwargs"))
    return TransformerLensOptions.of(kwargs if isinstance(kwargs, dict) else {}, processed=False)


def is_flat(cfg: dict[str, Any]) -> bool:
    """Whether SAELens reads `cfg` as a config written before SAELens 6."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return match is None or int(match.group(1)) < 6


def flat_to_current(cfg: dict[str, Any]) -> dict[str, Any]:
    """A flat config's fields under their SAELens 6 names (`handle_pre_6_0_config`)."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "hook_point_layer": "hook_layer",
    }
    new = {renames.get(key, key): value for key, value in cfg.items()}
    activation = new.get("activation_fn_str", new.get("activation_fn", "relu"))
    new["activation_fn"] = activation
    new.setdefault("architecture", "standard")
    kwargs = new.get("activation_fn_kwargs") or {}
    if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        new["architecture"] = "topk"
    if new["architecture"] == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
        new["k"] = kwargs["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = (
            "expected_average_only_in" if new["normalize_activations"] else "none"
        )
    return new


def architecture(file: Path, cfg: dict[str, Any]) -> str:
    name = cfg.get("architecture")
    if name not in ARCHITECTURES:
        raise SAEFileError(
            f"{file}: architecture {name!r} is not one load_sae reads (it reads "
            f"{', '.join(ARCHITECTURES)}; BatchTopK and Matryoshka SAEs are saved as jumprelu)"
        )
    activation = cfg.get("activation_fn", "relu")
    if name != "topk" and activation != "relu":
        # SAELens 6 drops the field and uses ReLU, where SAELens 5 applied the function
        # (or, for a topk without k, refused the config).
        raise SAEFileError(
            f"{file}: activation function {activation!r} "
            + ("without activation_fn_kwargs.k" if activation == "topk" else "is not supported")
        )
    return name


def top_k(file: Path, cfg: dict[str, Any]) -> int | None:
    if cfg.get("architecture") != "topk":
        return None
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int | float) or k != int(k) or k <= 0:
        raise SAEFileError(f"{file}: a topk SAE needs a positive integer k, not {k!r}")
    if isinstance(cfg.get("d_sae"), int) and k > cfg["d_sae"]:
        raise SAEFileError(f"{file}: k {k} exceeds d_sae {cfg['d_sae']}")
    return int(k)


def normalisation(file: Path, cfg: dict[str, Any]) -> str:
    name = cfg.get("normalize_activations") or "none"
    if name not in NORMALISATIONS:
        raise SAEFileError(
            f"{file}: normalize_activations {name!r} is not supported (expected one of "
            f"{', '.join(NORMALISATIONS)}; a covariance whitening must be folded into the "
            "weights first)"
        )
    return name


def positive_int(file: Path, cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFileError(f"{file}: {key} must be a positive integer, not {value!r}")
    return value


def optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def names(metadata: dict[str, Any], cfg: dict[str, Any], *keys: str) -> tuple[str, ...]:
    found = (metadata.get(key, cfg.get(key)) for key in keys)
    return tuple(name for name in found if isinstance(name, str) and name)


def hook_location(name: str) -> tuple[int, str] | None:
    """The (layer, site) of a TransformerLens or Hugging Face hook name; None when it
    names no site."""
    if (match := TL_HOOK.fullmatch(name)) and match.group(2) in TL_SITES:
        return int(match.group(1)), TL_SITES[match.group(2)]
    if (match := HF_HOOK.fullmatch(name)) and match.group(2) in HF_SITES:
        return int(match.group(1)), HF_SITES[match.group(2)]
    return None


def hook_layer(name: str) -> int | None:
    """The block a hook name is in, even where it names no site."""
    match = TL_HOOK.fullmatch(name) or HF_HOOK.fullmatch(name)
    return int(match.group(1)) if match else None


def first_location(hooks: tuple[str, ...]) -> tuple[int, str] | None:
    return next((loc for loc in map(hook_location, hooks) if loc is not None), None)


def location(
    config: SAELensConfig,
    layer: int | None = None,
    site: str | None = None,
    output_site: str | None = None,
) -> dict[str, Any]:
    """`layer`, `site` and `output_site` for `LinearSAE`: the options where given, else
    from the config's hook names; SAEFileError when a site is neither."""
    found = first_location(config.hooks)
    if config.hook_head_index is not None:
        found = None  # one head of a site is not the site
    if site is None and found is None:
        where = ", ".join(config.hooks) or "no hook_name"
        head = "" if config.hook_head_index is None else f" head {config.hook_head_index} of"
        raise SAEFileError(
            f"{config.file}: the SAE reads{head} {where}, which is none of load_sae's sites; "
            "pass site= (and layer=) to load it anyway"
        )
    if layer is None:
        named = [n for n in map(hook_layer, config.hooks) if n is not None]
        layers = [found[0]] if found else named
        layer = layers[0] if layers else config.hook_layer
    if config.is_transcoder and output_site is None:
        found_out = first_location(config.hooks_out)
        if found_out is None:
            where = ", ".join(config.hooks_out) or "no hook_name_out"
            raise SAEFileError(
                f"{config.file}: the transcoder writes {where}, which is none of load_sae's "
                "sites; pass output_site= to load it anyway"
            )
        output_site = found_out[1]
    return {"layer": layer, "site": site or found[1], "output_site": output_site}
