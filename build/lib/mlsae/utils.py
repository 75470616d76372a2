"""Small helpers shared by the commands and the analyses."""

from pathlib import Path

import torch


def get_repo_id(
    model_name: str,
    expansion_factor: int,
    k: int,
    tuned_lens: bool = False,
    transformer: bool = True,
    layers: list[int] | None = None,
) -> str:
    """The hub id of a published MLSAE for these hyperparameters, as the original
    names them: `tim-lawson/mlsae-pythia-70m-deduped-x64-k32[-lens][-tfm]`, and
    `tim-lawson/sae-...-layers-{L}` for a single-layer baseline (`layers=[L]`)."""
    name = model_name.split("/")[-1]
    repo_id = f"tim-lawson/mlsae-{name}-x{expansion_factor}-k{k}"
    if tuned_lens:
        repo_id += "-lens"
    if transformer:
        repo_id += "-tfm"
    if layers is not None:
        repo_id = repo_id.replace("mlsae", "sae") + f"-layers-{''.join(map(str, layers))}"
    return repo_id


def get_device() -> torch.device:
    """CUDA when available, otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def local_model_name(path: str) -> str:
    """The name of a model saved in a local folder: the folder's name, or the run's name
    for a model that train.py saved to `<run>/model`."""
    folder = Path(path.rstrip("/"))
    if folder.name == "model" and folder.parent.name:
        folder = folder.parent
    return folder.name
