"""Small helpers shared by the commands and the analyses."""

import torch

from mlsae.names import get_repo_id, local_model_name

__all__ = ["get_device", "get_repo_id", "local_model_name"]


def get_device() -> torch.device:
    """CUDA when available, otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
