"""`load_sae`: one SAE from a local folder or file, or from a hub repository (one of its
subfolders where it keeps several), in any format of `mlsae.saes.registry.FORMATS`."""

import os
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from mlsae.lm.hub_access import (
    MLSAE_REMEDY,
    NotOnHubError,
    offline_reason,
    require_hub_id,
    require_local,
    unreachable,
)
from mlsae.saes.base import SAE
from mlsae.saes.registry import FORMATS, SAEFileError, check_options, detect

ROOT_FILES = (".json", ".safetensors", ".npz", ".pt", ".pth")
"""Suffixes of the files that an SAE at the root of a hub repository is made of."""


def load_sae(
    path_or_repo_id: str | os.PathLike[str],
    format: str | None = None,
    *,
    subfolder: str | None = None,
    hookpoint: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> SAE:
    """Load one SAE. `path_or_repo_id` is a local folder or file, or a hub id;
    `subfolder` (or `hookpoint`, sparsify's name for it) picks one SAE of a folder or
    repository that holds several. `format` is detected from the files unless given;
    `options` are the format's own (e.g. `layer=` and `site=` where the files do not say
    them). The SAE is put on `device` and cast to `dtype` when given.
    """
    if format is not None and format not in FORMATS:
        raise SAEFileError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if subfolder is not None and hookpoint is not None and subfolder != hookpoint:
        raise SAEFileError("pass subfolder= or hookpoint= (the same thing), not both")
    inner = subfolder or hookpoint
    path = local_path(str(path_or_repo_id), inner)
    chosen = FORMATS[format] if format is not None else detect(path)
    check_options(chosen, options)
    sae = chosen.load(path, **options)
    return sae.to(device=device, dtype=dtype) if device or dtype else sae


def local_path(name: str, subfolder: str | None) -> Path:
    """The local folder or file that holds the SAE: `name` itself (joined with
    `subfolder`) when it exists locally, else the hub repository `name`'s files, from the
    cache or downloaded."""
    require_local(name, "the SAE")
    if os.path.exists(os.path.expanduser(name)):
        path = Path(os.path.expanduser(name))
        if subfolder is not None:
            inner = path / subfolder
            if not inner.exists():
                raise SAEFileError(
                    f"{name} has no subfolder {subfolder} ({subfolders(path, subfolder)})"
                )
            path = inner
        return path
    return hub_snapshot(name, subfolder)


def subfolders(root: Path, subfolder: str) -> str:
    """The subfolders of the deepest folder on the way from `root` to `subfolder` that
    exists, as the choices to offer for a `subfolder` that does not."""
    if not root.is_dir():
        return "it is a file, not a folder"
    parts = [part for part in subfolder.split("/") if part]
    depth = max(i for i in range(len(parts) + 1) if root.joinpath(*parts[:i]).is_dir())
    folder = root.joinpath(*parts[:depth])
    names = sorted(
        "/".join([*parts[:depth], p.name])
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".")
    )
    where = "/".join(parts[:depth]) or "it"
    return f"{where} holds " + (", ".join(names[:20]) if names else "no subfolders")


def hub_subfolders(files: list[str], subfolder: str | None) -> list[str]:
    """The folders of a hub repository (whose files are `files`) at the deepest level on
    the way to `subfolder` that exists."""
    parts = [part for part in (subfolder or "").split("/") if part]
    for depth in range(len(parts), -1, -1):
        prefix = "".join(part + "/" for part in parts[:depth])
        inside = [f[len(prefix) :] for f in files if f.startswith(prefix)]
        folders = sorted({prefix + rest.split("/")[0] for rest in inside if "/" in rest})
        if folders:
            return folders[:20]
    return []


def hub_snapshot(repo_id: str, subfolder: str | None) -> Path:
    """The local copy of the hub repository `repo_id`'s files of one SAE: those under
    `subfolder`, or those at its root."""
    require_hub_id(repo_id, "the SAE")
    reason = offline_reason()
    prefix = "" if subfolder is None else subfolder.strip("/") + "/"
    try:
        if reason is None:
            files = huggingface_hub.list_repo_files(repo_id)
            wanted = [f for f in files if f.startswith(prefix)]
            if subfolder is None:
                wanted = [f for f in files if "/" not in f and f.endswith(ROOT_FILES)]
            if not wanted:
                holding = hub_subfolders(files, subfolder)
                raise SAEFileError(
                    f"the hub repository {repo_id} has no SAE "
                    + (f"under {subfolder}" if subfolder else "at its root")
                    + (f"; pass subfolder= one of {', '.join(holding)}" if holding else "")
                )
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=wanted)
        else:
            patterns = [prefix + "*"] if subfolder else [f"*{s}" for s in ROOT_FILES]
            folder = huggingface_hub.snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=True
            )
    except (LocalEntryNotFoundError, huggingface_hub.errors.OfflineModeIsEnabled) as error:
        raise unreachable(
            "the SAE", repo_id, reason or "the hub could not be reached", MLSAE_REMEDY
        ) from error
    except RepositoryNotFoundError as error:
        raise NotOnHubError(
            f"the SAE {repo_id!r} is neither a local path nor a repository on the hub (if it "
            "is private or gated, log in with `hf auth login`)"
        ) from error
    path = Path(folder) / prefix if subfolder else Path(folder)
    if not path.exists():
        raise unreachable("the SAE", f"{repo_id}/{subfolder}", reason or "not cached", MLSAE_REMEDY)
    return path
