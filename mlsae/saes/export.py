"""One layer of an MLSAE as an SAE that SAELens 6 loads (`SAE.load_from_disk`):

    python -m mlsae.saes.export --repo_id <model> --format saelens --layer L --output_dir DIR

writes `DIR/cfg.json` and `DIR/sae_weights.safetensors`, and `export_saelens(model, layer,
output_dir)` does the same in Python. The SAELens SAE computes what the MLSAE computes on
that layer's inputs (`mlsae.model.autoencoder`):

- `normalize_activations: "layer_norm"` when the MLSAE standardises (SAELens' formula is the
  MLSAE's: centre, divide by the unbiased std plus 1e-5; the output multiplied by that std,
  without the 1e-5, and re-centred), `"none"` otherwise;
- `apply_b_dec_to_input: true` with `b_dec` the pre-encoder bias and `b_enc` zeros, so that
  `pre = (x_std - b) @ W_enc`; `W_enc = encoder.weight.T`, `W_dec = decoder.weight.T`;
- `topk` with the MLSAE's `k` (top k of the pre-activations, then ReLU), also for a
  Matryoshka MLSAE that selects the top k. A BatchTopK MLSAE (BatchTopK, or Matryoshka's
  default selection) is written as SAELens writes its own for inference
  (`process_state_dict_for_saving_inference` in SAELens' batchtopk_sae.py): `jumprelu`, with
  its `batchtopk_threshold` (rounded down to float32) as every latent's `threshold`.

The weights are written as float32. `metadata.hook_name` says where the SAE reads: for the
residual stream leaving block L (`resid_post`) of a `-tfm` model, the Hugging Face module
path of that block (`gpt_neox.layers.L`, also `hf_hook_name`), with `model_class_name:
AutoModelForCausalLM` (SAELens' `HookedProxyLM` hooks that module's output); for other sites,
or where the language model's module names are not known (a plain MLSAE), the
TransformerLens 3 bridge name (`blocks.L.hook_out`, `blocks.L.mlp.hook_in`, ...), which reads
the Hugging Face model's own activations. Either name reads back through
`mlsae.saes.load_sae` as the same layer and site.

Refused (`ExportError`, one line): a model with a tuned lens (`-lens`), a layer it was not
trained on, an architecture other than TopK, BatchTopK or Matryoshka, a negative or
missing threshold, an unknown site, a
format other than saelens, and a non-empty output folder without `overwrite`.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlsae.cli import ConfigError, parse, run_command
from mlsae.files import atomic_output
from mlsae.lm.sites import SITES
from mlsae.model.autoencoder import MLSAE
from mlsae.saes.formats.mlsae import MLSAEAdapter, is_mlsae_folder
from mlsae.saes.formats.mlsae import load as load_mlsae
from mlsae.saes.formats.mlsae_files import _BLOCK_KEY, WEIGHTS
from mlsae.saes.formats.saelens_config import hook_location
from mlsae.saes.load import local_path

EXPORT_FORMATS = ("saelens",)
SAELENS_VERSION = "6.0.0"
"""The layout of the config written (SAELens reads one below 6 as the flat, older one)."""

LAYER_NORM_EPS = 1e-5
"""The eps of the MLSAE's standardisation and of SAELens' `layer_norm`: the same."""

BRIDGE_HOOKS = {
    "resid_pre": "hook_in",
    "resid_post": "hook_out",
    "attn_out": "attn.hook_out",
    "mlp_out": "mlp.hook_out",
    "mlp_in": "mlp.hook_in",
    "attn_z": "attn.o.hook_in",
}
"""The TransformerLens 3 bridge hook (after `blocks.<L>.`) of each site: the Hugging Face
model's own activations, unlike a `HookedTransformer`'s for `mlp_in`."""

ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
"""The `autoencoder.architecture` values exported (`mlsae.model.variants`)."""


class ExportError(ConfigError):
    """A model, layer or folder that cannot be exported as asked: SAELens cannot express
    it, or it would overwrite files."""


@dataclass(frozen=True)
class ExportSource:
    """What an export needs of an MLSAE."""

    autoencoder: MLSAE
    layers: list[int] | None
    """The blocks it was trained on (None where that is not known: a plain MLSAE)."""

    site: str = "resid_post"
    model_name: str | None = None
    """The language model (None where not known)."""

    blocks_path: str | None = None
    """The Hugging Face module path of the language model's blocks (`gpt_neox.layers`)."""

    tuned_lens: bool = False


@dataclass
class ExportConfig:
    """Export one layer of an MLSAE as an SAE that SAELens 6 loads (cfg.json and
    sae_weights.safetensors; docs/saes.md, "Exporting to SAELens")."""

    repo_id: str
    """A hub id or local folder of a saved MLSAE: a -tfm model, or a plain MLSAE (which does
    not record its blocks, site or language model: block --layer's resid_post is assumed)."""

    layer: int
    """The block whose inputs the exported SAE reads (one the MLSAE was trained on)."""

    output_dir: str
    """The folder to write cfg.json and sae_weights.safetensors to."""

    format: str = "saelens"
    """The format to write; only saelens (SAELens 6) is supported."""

    overwrite: bool = False
    """Replace output_dir when it exists and is not empty (the whole folder is replaced)."""


def saelens_files(
    encoder_weight: Tensor,
    decoder_weight: Tensor,
    pre_encoder_bias: Tensor,
    k: int,
    standardize: bool,
    threshold: float | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The SAELens 6 config (without metadata) and weights of an MLSAE's weights: `topk`
    with `k`, or, given a `threshold`, `jumprelu` with it for every latent."""
    n_latents, n_inputs = encoder_weight.shape
    if tuple(decoder_weight.shape) != (n_inputs, n_latents):
        raise ExportError(
            f"decoder weight has shape {tuple(decoder_weight.shape)}, not "
            f"[n_inputs, n_latents] = [{n_inputs}, {n_latents}]"
        )
    if threshold is not None and not math.isfinite(threshold):
        raise ExportError(f"the threshold must be a finite number, not {threshold}")
    tensors = {
        "W_enc": encoder_weight.T,
        "b_enc": encoder_weight.new_zeros(n_latents),
        "W_dec": decoder_weight.T,
        "b_dec": pre_encoder_bias,
    }
    if threshold is not None:
        tensors["threshold"] = torch.full((n_latents,), float(threshold))
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    config: dict[str, Any] = {
        "architecture": "jumprelu" if threshold is not None else "topk",
        "d_in": n_inputs,
        "d_sae": n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if standardize else "none",
        "reshape_activations": "none",
    }
    if threshold is None:
        config.update(k=k, rescale_acts_by_decoder_norm=False)
    return config, tensors


def inference_threshold(autoencoder: MLSAE) -> float | None:
    """None for an MLSAE that selects the top k at inference (TopK, and Matryoshka with
    `matryoshka_selection topk`); the JumpReLU threshold of a BatchTopK one (BatchTopK,
    Matryoshka's default), which at inference keeps every pre-activation above
    `batchtopk_threshold` (`MLSAE._select_variant`), as SAELens' `jumprelu` does."""
    architecture = getattr(autoencoder, "architecture", None) or "topk"
    if architecture not in ARCHITECTURES:
        raise ExportError(
            f"an MLSAE of architecture {architecture!r} has no SAELens equivalent (exported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    variant = getattr(autoencoder, "variant", None)
    selection = getattr(variant, "selection", "topk" if architecture == "topk" else "batchtopk")
    if selection == "topk":
        capacity = getattr(variant, "capacity", autoencoder.k)
        if capacity != autoencoder.k:
            raise ExportError(f"this {architecture} MLSAE selects {capacity} latents, not k")
        return None
    if selection != "batchtopk":
        raise ExportError(f"an MLSAE selecting with {selection!r} has no SAELens equivalent")
    threshold = getattr(autoencoder, "batchtopk_threshold", None)
    value = float(threshold) if threshold is not None else math.nan
    if not math.isfinite(value) or value < 0:
        raise ExportError(
            f"this {architecture} MLSAE's batchtopk_threshold is {value}, not a finite number "
            ">= 0 (it is learnt in training; below 0, the MLSAE keeps negative values, which "
            "SAELens' jumprelu zeroes)"
        )
    return float32_below(value)


def float32_below(value: float) -> float:
    """The largest float32 at most `value`: a float32 `v` exceeds it exactly when `v`
    exceeds `value` (the MLSAE compares in float64, SAELens in float32)."""
    rounded = torch.tensor(value, dtype=torch.float32)
    if rounded.double() > value:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf))
    return float(rounded)


def hook_metadata(layer: int, site: str, blocks_path: str | None) -> dict[str, Any]:
    """`metadata`'s hook fields for `site` of block `layer`: the Hugging Face block path for
    `resid_post`, where known and read back as that layer and site, else the TransformerLens
    3 bridge name."""
    if site == "resid_post" and blocks_path:
        name = f"{blocks_path}.{layer}"
        if hook_location(name) == (layer, site):
            return {
                "model_class_name": "AutoModelForCausalLM",
                "hook_name": name,
                "hf_hook_name": name,
            }
    name = f"blocks.{layer}.{BRIDGE_HOOKS[site]}"
    assert hook_location(name) == (layer, site), name
    return {"hook_name": name}


def source_of(model: Any) -> ExportSource:
    """An `ExportSource` of a `-tfm` `MLSAETransformer`, an `MLSAEAdapter` (`load_sae`), a
    plain `MLSAE`, an `ExportSource`, or a hub id or local folder of a saved one."""
    if isinstance(model, ExportSource):
        return model
    if isinstance(model, str | os.PathLike):
        return read_source(str(model))
    if isinstance(model, MLSAE):
        return ExportSource(model, None)
    if isinstance(model, MLSAEAdapter):
        return ExportSource(model.autoencoder, model.layers, model.site)
    hparams = getattr(model, "hyperparameters", None)
    if isinstance(getattr(model, "autoencoder", None), MLSAE) and hparams is not None:
        return ExportSource(
            model.autoencoder,
            list(model.layers),
            hparams.site,
            hparams.model_name,
            getattr(model.transformer, "blocks_path", None),
            bool(hparams.tuned_lens),
        )
    raise ExportError(
        f"cannot export a {type(model).__name__}: pass an MLSAETransformer, an MLSAE, an SAE "
        "that load_sae read from an MLSAE, or the hub id or folder of a saved one"
    )


def read_source(repo_id: str) -> ExportSource:
    """The MLSAE saved at `repo_id` (a hub id or local folder; `-tfm` or plain), read as
    `load_sae` reads it (the language model is not loaded)."""
    path = local_path(repo_id, None)
    folder = path if path.is_dir() else path.parent
    if not is_mlsae_folder(folder):
        raise ExportError(
            f"{repo_id} is no saved MLSAE: it holds no config.json of a -tfm model or of a "
            "plain MLSAE (export takes this library's models, not other SAE formats)"
        )
    adapter = load_mlsae(folder)
    assert isinstance(adapter, MLSAEAdapter)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_name = config.get("model_name")
    return ExportSource(
        adapter.autoencoder,
        adapter.layers,
        adapter.site,
        model_name if isinstance(model_name, str) else None,
        saved_blocks_path(folder),
    )


def saved_blocks_path(folder: Path) -> str | None:
    """The module path of the language model's blocks, from the tensor names of a `-tfm`
    folder's safetensors weights (None where there is none, or they are not clear)."""
    weights = next((folder / n for n in WEIGHTS if (folder / n).is_file()), None)
    if weights is None or weights.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(weights), framework="pt") as file:
            keys = list(file.keys())
    except (SafetensorError, OSError):
        return None
    paths = {match.group(1) for key in keys if (match := _BLOCK_KEY.match(key))}
    if not paths:
        return None
    depth = min(path.count(".") for path in paths)
    shallowest = [path for path in paths if path.count(".") == depth]
    return shallowest[0] if len(shallowest) == 1 else None


def check_layer(layer: Any, layers: list[int] | None) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ExportError(f"the layer must be a block index (0, 1, ...), not {layer!r}")
    if layers is not None and layer not in layers:
        raise ExportError(
            f"the MLSAE was not trained on layer {layer}: it was trained on layers {layers}"
        )
    return layer


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"the output folder {output_dir} is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"the output folder {output_dir} exists and is not empty: pass --overwrite "
            "(overwrite=True) to replace it, or choose another folder"
        )


def export_saelens(
    model: Any, layer: int, output_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write layer `layer` of the MLSAE `model` (see `source_of`) as an SAELens 6 SAE:
    `output_dir/cfg.json` and `output_dir/sae_weights.safetensors`, written together
    atomically. Returns `output_dir`; `ExportError` for what SAELens cannot express."""
    source = source_of(model)
    if source.tuned_lens:
        raise ExportError(
            "this MLSAE reads the residual stream through a tuned lens, which SAELens cannot "
            "express: export an MLSAE trained without one"
        )
    if source.site not in SITES:
        raise ExportError(f"unknown site {source.site!r}; expected one of {', '.join(SITES)}")
    layer = check_layer(layer, source.layers)
    output = Path(output_dir)
    check_output_dir(output, overwrite)
    autoencoder = source.autoencoder
    config, tensors = saelens_files(
        autoencoder.encoder.weight,
        autoencoder.decoder.weight,
        autoencoder.pre_encoder_bias,
        autoencoder.k,
        autoencoder.standardize,
        inference_threshold(autoencoder),
    )
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION}
    if source.model_name is not None:
        metadata["model_name"] = source.model_name
    metadata.update(hook_metadata(layer, source.site, source.blocks_path))
    metadata["hook_head_index"] = None
    metadata["exported_from"] = {"library": "mlsae", "layers": source.layers, "site": source.site}
    config["metadata"] = metadata
    return write_saelens(output, config, tensors)


def write_saelens(output: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """`cfg.json` and `sae_weights.safetensors` in the folder `output`, written together:
    the folder appears (or replaces the one there) only once both are complete."""
    with atomic_output(output, "the SAELens SAE") as partial:
        partial.mkdir(parents=True)
        save_file(tensors, str(partial / "sae_weights.safetensors"))
        text = json.dumps(config, indent=2) + "\n"
        (partial / "cfg.json").write_text(text, encoding="utf-8")
    return output


def export(config: ExportConfig) -> Path:
    """The command: check the options, read the model, write the SAE."""
    if config.format not in EXPORT_FORMATS:
        raise ExportError(
            f"--format {config.format} is not supported; the formats written are "
            f"{', '.join(EXPORT_FORMATS)}"
        )
    check_layer(config.layer, None)
    check_output_dir(Path(config.output_dir), config.overwrite)
    output = export_saelens(
        read_source(config.repo_id), config.layer, config.output_dir, overwrite=config.overwrite
    )
    print(f"Wrote layer {config.layer} of {config.repo_id} as an SAELens SAE to {output}")
    return output


def main(args: list[str] | None = None) -> Path:
    """`python -m mlsae.saes.export`: parse the command line and export."""
    return export(parse(ExportConfig, args))


if __name__ == "__main__":
    run_command(main)
