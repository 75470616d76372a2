"""Where models and datasets come from: a local path, or the Hugging Face hub, reached at
once or not at all.

A name that can only be a path (`looks_local`) is never sent to the hub: when it does not
exist, that is said at once, with the closest existing name. Before a hub lookup,
`offline_reason` says whether the hub can be used: not with `HF_HUB_OFFLINE=1`, nor when a
connection to the hub's host fails (tried once per process, for at most `PROBE_TIMEOUT_S`
seconds; skipped behind an HTTPS proxy). Without the hub, models come from the local cache
only, and one that is not there is named in one error that says how to work offline, instead
of the hub client's retries. docs/models.md describes it for users.
"""

import difflib
import functools
import os
import socket
import urllib.parse
from typing import Any

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mlsae.cli import UserError

PROBE_TIMEOUT_S = 3.0
"""How long the one connection attempt that tells whether the hub can be reached may take."""


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "ON", "YES", "TRUE")


class HubUnreachableError(UserError, ConnectionError):
    """A model or dataset that must come from the hub, which cannot be used."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A local path that does not exist, or a name that is neither a path nor a hub id."""


class NotOnHubError(UserError, FileNotFoundError):
    """A hub id that the hub does not know (or keeps private)."""


def offline_reason() -> str | None:
    """Why the hub cannot be used (`HF_HUB_OFFLINE=1`, or no connection to it), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # Only the hub client knows how to go through the proxy.
    return _probe(constants.ENDPOINT)


@functools.cache
def _probe(endpoint: str) -> str | None:
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or endpoint
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as error:
        return f"the hub ({host}) cannot be reached ({error.strerror or str(error) or 'timed out'})"


def forget_probe() -> None:
    """Probe the hub again at the next lookup (the network may have changed)."""
    _probe.cache_clear()


def looks_local(path: str) -> bool:
    """Whether `path` can only name a local file or folder, never a hub id (`name` or
    `owner/name`): it starts with `.`, `~` or `/`, holds a backslash or more than one `/`,
    or its first component is a local folder."""
    if path.startswith((".", "~", "/")) or os.path.isabs(path) or "\\" in path:
        return True
    parts = path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def is_local(path: str) -> bool:
    """Whether `path` names a local file or folder, existing or not (`looks_local`)."""
    return os.path.exists(os.path.expanduser(path)) or looks_local(path)


def is_hub_id(name: str) -> bool:
    """Whether `name` is well-formed as a hub id (`name` or `owner/name`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def closest_path(path: str) -> str | None:
    """The existing sibling of `path` whose name is closest to its name (a typo's target)."""
    folder, name = os.path.split(path.rstrip("/"))
    try:
        names = os.listdir(os.path.expanduser(folder or "."))
    except OSError:
        return None
    matches = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return os.path.join(folder, matches[0]) if matches else None


def missing_path(path: str, what: str) -> PathNotFoundError:
    """The error for a local `path` that does not exist, with the closest existing one."""
    message = f"{what} {path} does not exist"
    guess = closest_path(path)
    if guess is not None:
        message += f" (did you mean {guess}?)"
    return PathNotFoundError(message)


def require_local(path: str, what: str) -> None:
    """Raise at once when `path` can only be local (`looks_local`) and does not exist."""
    if looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise missing_path(path, what)


def require_hub_id(name: str, what: str) -> None:
    """Raise when `name` is neither an existing local path nor a well-formed hub id."""
    if not is_hub_id(name):
        raise PathNotFoundError(f"{what} {name!r} is neither a local path nor a hub id")


MLSAE_REMEDY = (
    "download it where the hub can be reached, or pass a local folder as --repo_id (the "
    "README's quick start trains one offline, from quickstart/model and quickstart/data)"
)
LANGUAGE_MODEL_REMEDY = (
    "download it where the hub can be reached, or pass a local folder as --model_name "
    "(model_name= in Python), such as the README's quick start's quickstart/model"
)
DATASET_REMEDY = "pass local files with --path, such as the README's quick start's quickstart/data"


def unreachable(what: str, name: str, reason: str, remedy: str) -> HubUnreachableError:
    """The error for `name` that must come from the hub, which `reason` keeps out of reach."""
    return HubUnreachableError(
        f"cannot load {what} {name!r}: {reason}, and it is not in the local cache "
        f"({constants.HF_HUB_CACHE}); {remedy}"
    )


def hub_file(repo_id: str, filename: str, what: str, **download_kwargs: Any) -> str:
    """The local path of `filename` of the hub model `repo_id`, from the cache or
    downloaded; without the hub (`offline_reason`), from the cache only.

    Raises HubUnreachableError (not cached, no hub), NotOnHubError (no such model on the
    hub) or PathNotFoundError (not a hub id) naming `what`; a repository without
    `filename` raises huggingface_hub's EntryNotFoundError.
    """
    require_hub_id(repo_id, what)
    reason = offline_reason()
    if reason is not None:
        download_kwargs["local_files_only"] = True
    try:
        return huggingface_hub.hf_hub_download(
            repo_id=repo_id, filename=filename, **download_kwargs
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if reason is None and download_kwargs.get("local_files_only"):
            reason = "local_files_only=True"
        raise unreachable(
            what, repo_id, reason or "the hub could not be reached", MLSAE_REMEDY
        ) from error
    except RepositoryNotFoundError as error:
        raise NotOnHubError(
            f"{what} {repo_id!r} is neither a local folder nor a model on the hub (if it is "
            "private or gated, log in with `hf auth login`)"
        ) from error


def language_model_options(name: str) -> dict[str, Any]:
    """The transformers `from_pretrained` options for the language model `name` (a local
    folder or a hub id): `local_files_only=True` without the hub.

    Raises at once for a local folder that does not exist, a name that is no hub id, and,
    without the hub, a hub model that is not in the cache.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return {}
    require_local(name, "the language model folder")
    require_hub_id(name, "the language model")
    reason = offline_reason()
    if reason is None:
        return {}
    if not isinstance(huggingface_hub.try_to_load_from_cache(name, constants.CONFIG_NAME), str):
        raise unreachable("the language model", name, reason, LANGUAGE_MODEL_REMEDY)
    return {"local_files_only": True}


def require_hub_dataset(name: str) -> None:
    """Raise at once when the hub dataset `name` cannot be streamed: it is no hub id, or the
    hub cannot be used (streaming reads from the hub, never from the cache)."""
    require_hub_id(name, "the dataset")
    reason = offline_reason()
    if reason is not None:
        raise HubUnreachableError(
            f"cannot stream the hub dataset {name!r}: {reason}; {DATASET_REMEDY}"
        )
