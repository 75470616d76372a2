"""Paths to the outputs of the original implementation copied into the test data."""

from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDENS = Path(__file__).parent / "data" / "goldens"


def load_golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDENS / name)
