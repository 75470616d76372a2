"""sparsify (EleutherAI): a checkpoint folder holds one subfolder per hookpoint (`layers.5`,
`layers.5.mlp`, ...), each with `cfg.json` and `sae.safetensors` (`encoder.weight
[d_sae, d_in]`, `encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`, and `W_skip [d_in, d_in]`
when `skip_connection` is set).

sparsify's `SparseCoder` (sparse_coder.py, fused_encoder.py, release 1.3) computes
`pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias)` (no `- b_dec` for a transcoder,
`transcode: true`), keeps the `k` largest (`activation: "topk"`) or the largest of each of
`k` groups of `d_sae // k` consecutive latents (`"groupmax"`), decodes
`acts @ W_dec + b_dec`, and adds `x @ W_skip.T` in `forward` only. `normalize_decoder`
acts during training only: the decoder is used as saved.

A hookpoint is the name of a module of the model's `base_model`; the SAE reads the module's
output, a transcoder its (first) input. `layers.N` (`h.N` for GPT-2-like models) is block
N's output, `layers.N.mlp` the MLP's and `layers.N.self_attn`/`attention`/`attn` the
attention's; `embed_tokens` (`embed_in`) is the residual stream entering block 0, as
sparsify's README pairs it with the model's first hidden state. Other hookpoints give the
layer only: pass `site=` (and `output_site=` for a transcoder).
"""

import json
import re
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mlsae.saes.base import SAE
from mlsae.saes.linear import LinearSAE
from mlsae.saes.registry import Format, SAEFileError, register, unknown_options

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")

BLOCK = re.compile(r"(?:.+\.)?(?:layers|h)\.(\d+)(?:\.(.+))?")
EMBEDDINGS = ("embed_tokens", "embed_in")
SEED_FOLDER = re.compile(r"seed\d+")
"""The subfolder of each seed when one run trains several coders per hookpoint."""

SITES_OF_MODULE: dict[str | None, tuple[str | None, str]] = {
    # module (None: the whole block) -> (site of its input, site of its output)
    None: ("resid_pre", "resid_post"),
    "mlp": ("mlp_in", "mlp_out"),
    # The attention reads the normalised residual stream, which no site names.
    "self_attn": (None, "attn_out"),
    "attention": (None, "attn_out"),
    "attn": (None, "attn_out"),
}


class GroupMaxSAE(LinearSAE):
    """sparsify's groupmax coder: the latents form `k` groups of `d_sae // k` consecutive
    latents, and each group keeps only its largest ReLU'd pre-activation."""

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        groups = pre.relu().unflatten(-1, (self.k, -1))
        top = groups.max(dim=-1, keepdim=True)
        return torch.zeros_like(groups).scatter(-1, top.indices, top.values).flatten(-2)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("activation=topk", "activation=groupmax")


def hookpoint_of(folder: Path) -> str:
    """The hookpoint a coder's folder is named after (`layers.5/seed0` is `layers.5`'s)."""
    return folder.parent.name if SEED_FOLDER.fullmatch(folder.name) else folder.name


def where_from_hookpoint(hookpoint: str, transcode: bool) -> dict[str, Any]:
    """The layer, site and (for a transcoder) output site of a hookpoint's coder; None
    where the name does not say."""
    if hookpoint.rsplit(".", 1)[-1] in EMBEDDINGS:
        sites: tuple[str | None, str | None] = (None, "resid_pre")
        layer: int | None = 0
    elif match := BLOCK.fullmatch(hookpoint):
        layer = int(match.group(1))
        sites = SITES_OF_MODULE.get(match.group(2), (None, None))
    else:
        layer, sites = None, (None, None)
    if transcode:
        return {"layer": layer, "site": sites[0], "output_site": sites[1]}
    return {"layer": layer, "site": sites[1], "output_site": None}


def coder_folder(path: Path) -> Path:
    """The folder of one coder: `path`, or the folder of its `cfg.json`/`sae.safetensors`;
    SAEFileError naming the hookpoints when `path` is a whole checkpoint."""
    folder = path.parent if path.is_file() else path
    if (folder / CONFIG).is_file():
        return folder
    hookpoints = sorted(p.name for p in folder.iterdir() if (p / CONFIG).is_file())
    if hookpoints:
        raise SAEFileError(
            f"{folder} holds the sparsify coders of several hookpoints; pass hookpoint= one "
            f"of {', '.join(hookpoints[:20])}"
        )
    raise SAEFileError(f"{folder} has no {CONFIG}: it is no sparsify coder's folder")


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_config(file: Path) -> dict[str, Any]:
    """`cfg.json`, checked for what sparsify 1.3's `SparseCoder` supports."""
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{file} is not a readable JSON config ({error})") from None
    if not isinstance(cfg, dict):
        raise SAEFileError(f"{file} holds no JSON object")
    for key in ("d_in", "k"):
        if not is_count(cfg.get(key)) or cfg[key] == 0:
            raise SAEFileError(f"{file}: {key} is {cfg.get(key)!r}, not a positive integer")
    for key in ("num_latents", "expansion_factor"):
        if key in cfg and not is_count(cfg[key]):
            raise SAEFileError(f"{file}: {key} is {cfg[key]!r}, not a count")
    for key in ("transcode", "skip_connection", "signed"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise SAEFileError(f"{file}: {key} is {cfg[key]!r}, not true or false")
    activation = cfg.get("activation", "topk")
    if activation not in ACTIVATIONS:
        raise SAEFileError(
            f"{file}: activation {activation!r} is not one sparsify 1.3 has "
            f"({', '.join(ACTIVATIONS)})"
        )
    if cfg.get("signed", False):
        # Early sparsify (2024) ranked latents by |pre| without ReLU; later releases ignore it.
        raise SAEFileError(f"{file}: signed coders (no ReLU) are not supported")
    return cfg


def expected_latents(cfg: dict[str, Any]) -> int:
    # sparse_coder.py: `cfg.num_latents or d_in * cfg.expansion_factor` (defaults 0 and 32).
    return cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 32)


def read_weights(file: Path, cfg: dict[str, Any], cfg_file: Path) -> dict[str, Tensor]:
    """The coder's tensors as float32, checked against `cfg.json` as sparsify's strict
    `load_model` would (no tensor missing, none unexpected, every shape right)."""
    try:
        tensors = load_file(file)
    except (OSError, SafetensorError) as error:
        raise SAEFileError(f"{file} is not a readable safetensors file ({error})") from None
    d_in, d_sae = cfg["d_in"], expected_latents(cfg)
    shapes = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    if cfg.get("skip_connection", False):
        shapes["W_skip"] = (d_in, d_in)
    missing = [name for name in shapes if name not in tensors]
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        problems = [f"it lacks {', '.join(missing)}"] if missing else []
        problems += [f"it holds unexpected {', '.join(unexpected)}"] if unexpected else []
        raise SAEFileError(f"{file} does not match {cfg_file}: {'; '.join(problems)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFileError(
                f"{file}: {name} has shape {list(tensors[name].shape)}, but {cfg_file} "
                f"(d_in {d_in}, {d_sae} latents) needs {list(shape)}"
            )
    return {name: tensors[name].float() for name in shapes}


def check_k(cfg: dict[str, Any], d_sae: int, file: Path) -> None:
    k, activation = cfg["k"], cfg.get("activation", "topk")
    if k > d_sae:
        raise SAEFileError(f"{file}: k is {k}, more than the {d_sae} latents")
    if activation == "groupmax" and d_sae % k:
        raise SAEFileError(f"{file}: groupmax needs k ({k}) to divide the {d_sae} latents")


def load(
    path: Path,
    layer: int | None = None,
    site: str | None = None,
    output_site: str | None = None,
    **options: Any,
) -> SAE:
    """The coder in `path` (its folder, or one of its two files); `layer`, `site` and
    `output_site` take precedence over what the hookpoint's name says."""
    unknown_options(options, "sparsify")
    folder = coder_folder(path)
    cfg = read_config(folder / CONFIG)
    tensors = read_weights(folder / WEIGHTS, cfg, folder / CONFIG)
    d_sae = tensors["W_dec"].shape[0]
    check_k(cfg, d_sae, folder / CONFIG)
    transcode = bool(cfg.get("transcode", False))
    where = where_from_hookpoint(hookpoint_of(folder), transcode)
    given = {"layer": layer, "site": site, "output_site": output_site}
    where.update({key: value for key, value in given.items() if value is not None})
    kind = GroupMaxSAE if cfg.get("activation", "topk") == "groupmax" else LinearSAE
    sae = kind(
        tensors["encoder.weight"].T.contiguous(),
        tensors["encoder.bias"],
        tensors["W_dec"],
        tensors["b_dec"],
        activation="topk",
        k=cfg["k"],
        subtract_decoder_bias=not transcode,
        # sparse_coder.py's forward adds `x @ W_skip.mT`: the file holds [d_out, d_in].
        W_skip=tensors["W_skip"].T.contiguous() if "W_skip" in tensors else None,
        **where,
    )
    sae.format = "sparsify"
    return sae


register(Format("sparsify", marks=(CONFIG, WEIGHTS), load=load))
