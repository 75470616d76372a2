"""Gemma Scope: `params.npz` with `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`,
`b_dec` and a JumpReLU `threshold` per latent; the input is not centred (Google's
Gemma Scope tutorial: `pre = x @ W_enc + b_enc`, `acts = relu(pre) * (pre > threshold)`,
`recon = acts @ W_dec + b_dec`).

The layer comes from the release's `layer_<L>/width_<W>/average_l0_<N>/` path and the site
from its repository's name (`-res`: the block's output, `-mlp`: the MLP's output, `-att`:
the concatenated head outputs), unless `layer=`/`site=` say otherwise.
"""

import re
from pathlib import Path

import numpy as np
import torch

from mlsae.saes.base import SAE
from mlsae.saes.linear import LinearSAE
from mlsae.saes.registry import Format, SAEFileError, register

TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SITE_OF_RELEASE = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}


def layer_from_path(path: Path) -> int | None:
    for part in reversed(path.parts):
        if match := re.fullmatch(r"layer_(\d+)", part):
            return int(match.group(1))
    return None


def site_from_path(path: Path) -> str | None:
    """The site of the release whose repository name (or hub cache folder) is in `path`."""
    for part in reversed(path.parts):
        if match := re.search(r"gemma-scope-[\w.-]*?-(res|mlp|att)(?:-|$)", part):
            return SITE_OF_RELEASE[match.group(1)]
    return None


def read_params(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of `params.npz` (never unpickled: object arrays are refused)."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an archive of named tensors")
        with loaded as params:
            arrays = {name: params[name] for name in params.files}
    except (ValueError, OSError) as error:
        raise SAEFileError(f"{file} is not a readable Gemma Scope params.npz ({error})") from None
    missing = [name for name in TENSORS if name not in arrays]
    if missing:
        raise SAEFileError(f"{file} lacks the tensors {', '.join(missing)}")
    for name in TENSORS:
        if not np.issubdtype(arrays[name].dtype, np.number):
            raise SAEFileError(f"{file}: {name} holds {arrays[name].dtype}, not numbers")
    return {name: torch.from_numpy(np.array(arrays[name], dtype=np.float32)) for name in TENSORS}


def check_shapes(file: Path, t: dict[str, torch.Tensor]) -> None:
    if t["W_enc"].ndim != 2:
        raise SAEFileError(f"{file}: W_enc has shape {tuple(t['W_enc'].shape)}, not [d_in, d_sae]")
    d_in, d_sae = t["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise SAEFileError(
                f"{file}: {name} has shape {tuple(t[name].shape)}, but W_enc [{d_in}, {d_sae}] "
                f"needs {list(shape)}"
            )


def load(path: Path, layer: int | None = None, site: str | None = None) -> SAE:
    file = path / "params.npz" if path.is_dir() else path
    if "embedding" in file.parts[:-1] and layer_from_path(file) is None:
        # These read the token embeddings on a scale of their own (SAELens rescales their
        # weights by sqrt(d_in) in gemma_2_sae_huggingface_loader): not a site read here.
        raise SAEFileError(
            f"{file} is a Gemma Scope embedding SAE, which reads the token embeddings rather "
            "than a block's site; load an SAE under layer_<L>/ instead"
        )
    tensors = read_params(file)
    check_shapes(file, tensors)
    sae = LinearSAE(
        tensors["W_enc"],
        tensors["b_enc"],
        tensors["W_dec"],
        tensors["b_dec"],
        activation="jumprelu",
        threshold=tensors["threshold"],
        subtract_decoder_bias=False,
        layer=layer_from_path(file) if layer is None else layer,
        site=site_from_path(file) if site is None else site,
    )
    sae.format = "gemma_scope"
    return sae


register(Format("gemma_scope", marks=("params.npz",), load=load, file_suffixes=(".npz",)))
