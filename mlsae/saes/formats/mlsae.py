"""This library's own models: a plain `MLSAE` saved with `save_pretrained` (`config.json`
with `n_inputs` and `n_latents`, `model.safetensors`), or an `MLSAETransformer` saved as a
`-tfm` folder (`config.json` with `model_name` and `expansion_factor`), of which only the
`autoencoder.*` tensors are read: the language model is never loaded.

One MLSAE reads one site of each block it was trained on, every layer with the same weights:
the `site` of a `-tfm` config (see `mlsae.lm.sites`), or `resid_post` (the block's output,
before any final norm) where the config has none, as for a plain `MLSAE`. `layers` lists
those blocks (None where the files do not say, as for a plain `MLSAE`: pass `layers=`);
`layer` is the block of a one-layer model, None otherwise. `encode` and `decode` are
`MLSAE.encode` and `MLSAE.decode`, so the per-vector standardisation, the pre-encoder bias
and the top-k are the model's own. Models trained with `skip_special_tokens` never saw the
BOS/EOS/PAD positions (they were zeroed): that is the data's concern, not the SAE's. A
`-lens` model reads the stream through its tuned lens, which this interface does not apply:
it is refused.
"""

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mlsae.lm.sites import SITES
from mlsae.model.autoencoder import MLSAE
from mlsae.model.resolve import saved_kind
from mlsae.saes import base
from mlsae.saes.base import SAE, SparseLatents
from mlsae.saes.formats.mlsae_files import read_plain, read_transformer
from mlsae.saes.registry import Format, SAEFileError, register
from mlsae.types import Stats, TopK

CONFIG = "config.json"
KINDS = ("MLSAE", "MLSAETransformer")


class MLSAEAdapter(SAE):
    """An `MLSAE` behind the `SAE` interface; `.autoencoder` is the model itself."""

    format = "mlsae"

    def __init__(
        self, autoencoder: MLSAE, layers: list[int] | None = None, site: str = "resid_post"
    ) -> None:
        one = layers[0] if layers is not None and len(layers) == 1 else None
        super().__init__(autoencoder.n_inputs, autoencoder.n_latents, one, site)
        self.autoencoder = autoencoder
        self.layers = layers
        """The blocks whose `site` the model reads, or None where the files do not say."""
        self._last_stats: Stats | None = None

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """`MLSAE.encode`'s top-k after ReLU, as dense latents; keeps the standardisation
        statistics for a `decode` called alone."""
        if x.ndim > 0 and x.shape[:-1].numel() == 0:
            # No vectors: nothing to standardise (whose statistics torch would warn about).
            self.autoencoder._check_inputs(x)
            none = x.new_zeros(*x.shape[:-1], 1)
            self._last_stats = Stats(none, none) if self.autoencoder.standardize else None
            return x.new_zeros(*x.shape[:-1], self.d_sae)
        output = self.autoencoder.encode(x)
        self._last_stats = output.stats
        return dense_latents(output.topk, self.d_sae)

    def decode(
        self, acts: Float[Tensor, "... d_sae"], stats: Stats | None = None
    ) -> Float[Tensor, "... d_in"]:
        """`MLSAE.decode` of the latents, un-standardised with `stats` (by default the
        statistics of the last `encode`) when the model standardises its inputs."""
        stats = self._last_stats if stats is None else stats
        if self.autoencoder.standardize:
            check_stats(stats, acts)
        else:
            stats = None
        return self.autoencoder.decode(latent_selection(acts), stats)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """`MLSAE.forward(x).recons`; like `encode`, keeps the statistics of `x`."""
        recons = self.autoencoder(x).recons
        self._last_stats = self.autoencoder._standardize(x)[1]
        return recons

    def encode_sparse(self, x: Float[Tensor, "... d_in"]) -> SparseLatents:
        """The non-zero latents, from `MLSAE.encode`'s top-k of `base.SPARSE_CHUNK` vectors
        at a time (the dense latents never exist)."""
        self.autoencoder._check_inputs(x)
        values, indices, counts = [], [], []
        for chunk in x.reshape(-1, self.d_in).split(base.SPARSE_CHUNK):
            if chunk.shape[0] == 0:
                continue
            topk = self.autoencoder.encode(chunk).topk
            order = topk.indices.argsort(dim=-1)
            chunk_values = topk.values.gather(-1, order).relu()
            kept = chunk_values != 0
            values.append(chunk_values[kept])
            indices.append(topk.indices.gather(-1, order)[kept].long())
            counts.append(kept.sum(dim=-1))
        counts_all = torch.cat(counts) if counts else x.new_zeros(0, dtype=torch.long)
        offsets = torch.cat([counts_all.new_zeros(1), counts_all.cumsum(0)])
        return SparseLatents(
            torch.cat(values) if values else x.new_zeros(0),
            torch.cat(indices) if indices else x.new_zeros(0, dtype=torch.long),
            offsets,
            (*x.shape[:-1], self.d_sae),
        )

    def extra_repr(self) -> str:
        model = self.autoencoder
        return (
            f"{super().extra_repr()}, layers={self.layers}, k={model.k}, "
            f"standardize={model.standardize}"
        )


def dense_latents(topk: TopK, d_sae: int) -> Float[Tensor, "... d_sae"]:
    """The top-k pre-activations after ReLU, zeros elsewhere."""
    dense = topk.values.new_zeros(*topk.values.shape[:-1], d_sae)
    return dense.scatter(-1, topk.indices.long(), topk.values.relu())


def latent_selection(acts: Float[Tensor, "... d_sae"]) -> TopK:
    """Every non-zero latent of each vector as a selection `MLSAE.decode` takes (as wide as
    the vector with the most, padded with zeros), whatever their sign."""
    width = int((acts != 0).sum(dim=-1).max()) if acts.numel() else 0
    indices = acts.abs().topk(width, dim=-1).indices
    return TopK(acts.gather(-1, indices), indices)


def check_stats(stats: Stats | None, acts: Tensor) -> None:
    """ValueError unless `stats` are statistics for the vectors of `acts`."""
    if stats is None:
        raise ValueError(
            "this MLSAE standardises its inputs: decode needs their statistics; call encode "
            "first or pass stats= (MLSAE.encode(x).stats)"
        )
    if stats.mean.shape[:-1] != acts.shape[:-1]:
        raise ValueError(
            f"decode's latents have leading shape {tuple(acts.shape[:-1])}, but the "
            f"statistics of the last encode are of shape {tuple(stats.mean.shape[:-1])}; "
            "pass stats= for these vectors"
        )


def read_config(file: Path) -> dict[str, Any]:
    """The JSON object of `file`; SAEFileError naming it when it is not one."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{file} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise SAEFileError(f"{file} must hold a JSON object")
    return config


def is_mlsae_folder(folder: Path) -> bool:
    """Whether the `config.json` of `folder` describes an `MLSAE` or `MLSAETransformer`."""
    try:
        return saved_kind(json.loads((folder / CONFIG).read_text(encoding="utf-8"))) in KINDS
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def chosen_layers(
    file: Path, saved: list[int] | None, asked: list[int] | int | None
) -> list[int] | None:
    """The layers the files say (`saved`), or else those asked for (`layers=`)."""
    if isinstance(asked, int) and not isinstance(asked, bool):
        asked = [asked]
    if asked is not None and not (
        isinstance(asked, list | tuple)
        and asked
        and all(isinstance(x, int) and not isinstance(x, bool) for x in asked)
    ):
        raise SAEFileError(f"layers= must be a block index or a list of them, not {asked!r}")
    asked = None if asked is None else list(asked)
    if saved is not None and asked is not None and asked != saved:
        raise SAEFileError(f"{file} was trained on layers {saved}; layers={asked} disagrees")
    return saved if saved is not None else asked


def load(path: Path, layers: list[int] | int | None = None) -> SAE:
    """The MLSAE of the folder `path` (or of the folder of one of its files)."""
    folder = path if path.is_dir() else path.parent
    file = folder / CONFIG
    config = read_config(file)
    kind = saved_kind(config)
    site = "resid_post"
    if kind == "MLSAE":
        autoencoder, saved = read_plain(folder), None
    elif kind == "MLSAETransformer":
        site = saved_site(file, config)
        autoencoder, saved = read_transformer(folder, config)
    else:
        raise SAEFileError(
            f"{file} describes no MLSAE: it holds neither n_inputs and n_latents (a plain "
            "MLSAE) nor model_name and expansion_factor (an MLSAETransformer)"
        )
    return MLSAEAdapter(autoencoder, chosen_layers(file, saved, layers), site)


def saved_site(file: Path, config: dict[str, Any]) -> str:
    """The site of an `MLSAETransformer`'s config (`resid_post` where it has none, as
    configs written before `site` existed)."""
    site = config.get("site", "resid_post")
    if site not in SITES:
        raise SAEFileError(f"{file}: site must be one of {', '.join(SITES)}, not {site!r}")
    return site


register(Format("mlsae", marks=(CONFIG,), load=load, claims=is_mlsae_folder))
