"""A transformer's weights told apart by a sample of them: the first and last
`SAMPLE_BYTES` of each parameter, hashed with its name, dtype and shape.

Any two checkpoints of a model differ there in practice (fine-tuning changes every
tensor), and the cost does not grow with the model, so a checkpoint can record which
frozen weights it was trained on instead of holding a copy of them."""

import hashlib
import json
from typing import Any

import torch
from torch import nn

SAMPLE_BYTES = 4096
"""Bytes taken from each end of every parameter."""


def hash_sample(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed `digest` the name, dtype and shape of `tensor` and a sample of its bytes."""
    header = {"name": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    digest.update(json.dumps(header).encode())
    flat = tensor.detach().reshape(-1)
    per_end = max(1, SAMPLE_BYTES // tensor.element_size())
    if flat.numel() > 2 * per_end:
        flat = torch.cat([flat[:per_end], flat[-per_end:]])
    digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().data)


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 (hex) of a sample of every parameter of `model` (`hash_sample`)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        hash_sample(digest, name, parameter)
    return digest.hexdigest()
