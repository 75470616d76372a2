"""Names of models, runs and outputs, and reading them back: one home for the naming scheme.

The published models are `tim-lawson/mlsae-<model>-x<E>-k<K>[-lens][-tfm]` (single-layer
baselines `tim-lawson/sae-<model>-x<E>-k<K>[-tfm]-layers-<L>`), with `-<site>` after
`-k<K>` for a model trained at a site other than the block output; a run is named
`mlsae-<model>-x<E>-k<K>[-<architecture>][-<site>][-layers-...]` unless `--run` names it;
analyses write `<output_dir>/<owner>-<name>-<suffix>.<extension>` and test results
`test_<name>.csv`; a
stack of per-layer SAEs is named after its pattern or first SAE, ending in `-stack`.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

PUBLISHER = "tim-lawson"
"""The hub owner of the published models."""

OTHER_SITES = ("resid_pre", "attn_out", "mlp_out", "mlp_in", "attn_z")
"""The sites (`mlsae.lm.sites.SITES`) other than the default, resid_post, that a name
carries."""

_SITE = re.compile(r"-(" + "|".join(OTHER_SITES) + r")(?=-|$)")

_PUBLISHED = re.compile(r"^(?:mlsae|sae)-(?P<model>.+)-x(?P<x>\d+)-k(?P<k>\d+)(?P<rest>.*)$")


def get_repo_id(
    model_name: str,
    expansion_factor: int,
    k: int,
    tuned_lens: bool = False,
    transformer: bool = True,
    layers: list[int] | None = None,
    site: str = "resid_post",
) -> str:
    """The hub id of a published MLSAE for these hyperparameters, as the original
    names them: `tim-lawson/mlsae-pythia-70m-deduped-x64-k32[-lens][-tfm]`, and
    `tim-lawson/sae-...-layers-{L}` for a single-layer baseline (`layers=[L]`); a model
    of another site than resid_post has `-<site>` after `-k<K>`."""
    name = model_name.split("/")[-1]
    repo_id = f"{PUBLISHER}/mlsae-{name}-x{expansion_factor}-k{k}"
    if site != "resid_post":
        repo_id += f"-{site}"
    if tuned_lens:
        repo_id += "-lens"
    if transformer:
        repo_id += "-tfm"
    if layers is not None:
        repo_id = repo_id.replace("mlsae", "sae") + f"-layers-{''.join(map(str, layers))}"
    return repo_id


@dataclass(frozen=True)
class PublishedName:
    """What a published model's name says about it."""

    model: str
    """The transformer's name, without its owner (e.g. `pythia-70m-deduped`)."""

    expansion_factor: int
    k: int
    tuned_lens: bool
    transformer: bool
    """Whether the name is the `-tfm` module's."""

    layers: str | None = None
    """The `-layers-` part of a single-layer baseline's name."""

    site: str = "resid_post"
    """The site the model reads (`-<site>` in the name; none for resid_post)."""


def parse_repo_id(repo_id: str) -> PublishedName | None:
    """What `get_repo_id` put into a name (the owner may be any), or None for another."""
    match = _PUBLISHED.match(repo_id.rstrip("/").split("/")[-1])
    if match is None:
        return None
    rest = match["rest"]
    layers = re.search(r"-layers-([\d-]+)", rest)
    return PublishedName(
        model=match["model"],
        expansion_factor=int(match["x"]),
        k=int(match["k"]),
        tuned_lens="-lens" in rest,
        transformer="-tfm" in rest,
        layers=layers[1] if layers else None,
        site=site[1] if (site := _SITE.search(rest)) else "resid_post",
    )


def run_name(
    model_name: str,
    expansion_factor: int,
    k: int,
    layers: list[int] | None,
    site: str = "resid_post",
    architecture: str = "topk",
) -> str:
    """A run's default name:
    `mlsae-<model>-x<E>-k<K>[-<architecture>][-<site>][-layers-<l1>-<l2>...]`, the
    architecture and site only where they are not the defaults (topk, resid_post)."""
    model = model_name.rstrip("/").split("/")[-1]
    name = f"mlsae-{model}-x{expansion_factor}-k{k}"
    if architecture != "topk":
        name += f"-{architecture}"
    if site != "resid_post":
        name += f"-{site}"
    if layers is not None:
        name += "-layers-" + "-".join(map(str, layers))
    return name


def local_model_name(path: str) -> str:
    """The name of a model saved in a local folder: the folder's name, or the run's name
    for a model that train.py saved to `<run>/model`."""
    folder = Path(path.rstrip("/"))
    if folder.name == "model" and folder.parent.name:
        folder = folder.parent
    return folder.name


def model_name_of(repo_id: str) -> str:
    """A model's name: the last part of its hub id, or `local_model_name` of a folder."""
    if os.path.isdir(repo_id):
        return local_model_name(repo_id)
    return Path(repo_id.rstrip("/")).name


def derived_name(repo_id: str, suffix: str) -> str:
    """The hub id of a model's analysis dataset: `...-tfm` becomes `...-<suffix>`.

    A local folder gives its name (`path/to/mlsae-x-tfm` -> `mlsae-x-<suffix>`; a model
    that train.py saved to `out/runs/<run>/model` -> `<run>-<suffix>`).
    """
    repo_id = repo_id.rstrip("/")
    if os.path.isdir(repo_id):
        repo_id = local_model_name(repo_id)
    if repo_id.endswith(f"-{suffix}"):
        return repo_id
    repo_id = repo_id.removesuffix("-tfm")
    return f"{repo_id}-{suffix}"


def cache_path(repo_id: str, suffix: str, extension: str, output_dir: str = "out") -> Path:
    """The local cache of an analysis, `<output_dir>/<owner>-<name>-<suffix>.<extension>`,
    as the original names it."""
    return Path(output_dir) / f"{derived_name(repo_id, suffix).replace('/', '-')}.{extension}"


STACK_SUFFIX = "stack"
"""What ends the name of a stack of per-layer SAEs, so that its outputs never take an
MLSAE's name."""


def stack_name(source: str) -> str:
    """The name of the analysis outputs of a stack of per-layer SAEs given as `source` (a
    pattern with `{layer}`, or its first SAE's path or hub id): its last two parts joined
    by `-`, `{layer}` written `L`, then `-stack` (`saes/run/layer_{layer}` ->
    `run-layer_L-stack`, `owner/sae-{layer}` -> `owner-sae-L-stack`)."""
    parts = [part for part in source.replace("\\", "/").split("/") if part not in ("", ".", "~")]
    name = "-".join(parts[-2:]).replace("{layer}", "L")
    return f"{name}-{STACK_SUFFIX}"


def csv_name(repo_id: str) -> str:
    """`test_<name>.csv`, as the original names test results (`model_name_of`)."""
    return f"test_{model_name_of(repo_id)}.csv"


def autoencoder_repo_id(tfm_id: str) -> str:
    """The plain autoencoder's id: the -tfm id without its -tfm."""
    return tfm_id.replace("-tfm", "", 1) if "-tfm" in tfm_id else tfm_id + "-sae"


def model_label(repo_id: str) -> str:
    """A short name for figures: `owner/mlsae-x-tfm` -> `mlsae-x`; a model that train.py
    saved to `<run>/model` -> the run's name; a file -> its name without the extension."""
    path = Path(repo_id.rstrip("/"))
    if path.is_file():
        return path.name.split(".")[0]
    return model_name_of(repo_id).removesuffix("-tfm")
