"""Tuned-lens translators (Belrose et al., 2023) applied around the autoencoder.

For the paper's `-lens` models the autoencoder sees `h + A_i h + b_i` instead of
block i's output `h`, and its reconstructions are mapped back with the inverse
`(I + A_i)^-1 (y - b_i)`. The published checkpoints pair translator i with the
output of block i (as the original did), although the tuned-lens package trained
translator i on `hidden_states[i]`, whose index 0 is the embeddings: that pairing
is kept here so those checkpoints give their published numbers.
"""

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from jaxtyping import Float
from torch import Tensor, nn

from mlsae.files import load_as_data

TUNED_LENS_SPACE = "AlignmentResearch/tuned-lens"


class TunedLens(nn.Module):
    """One affine translator per decoder block; state-dict keys
    `layer_translators.{i}.weight|bias`, as in the tuned-lens package."""

    def __init__(self, d_model: int, n_blocks: int) -> None:
        super().__init__()
        self.layer_translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_blocks))
        for translator in self.layer_translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
        self.requires_grad_(False)

    def forward(
        self, inputs: Float[Tensor, "layer batch pos d_model"], blocks: list[int]
    ) -> Float[Tensor, "layer batch pos d_model"]:
        """Translate the stack, entry j by translator `blocks[j]` (never in place)."""
        return torch.stack(
            [x + self.layer_translators[b](x) for x, b in zip(inputs, blocks, strict=True)]
        )

    def inverse(
        self, outputs: Float[Tensor, "layer batch pos d_model"], blocks: list[int]
    ) -> Float[Tensor, "layer batch pos d_model"]:
        """Undo `forward`: solve `(I + A) h = y - b` for every entry of the stack."""
        restored = []
        for y, block in zip(outputs, blocks, strict=True):
            translator = self.layer_translators[block]
            matrix = translator.weight.double() + torch.eye(
                translator.weight.shape[0], dtype=torch.float64, device=y.device
            )
            shifted = (y - translator.bias).double()
            solved = torch.linalg.solve(matrix, shifted.reshape(-1, y.shape[-1]).T).T
            restored.append(solved.reshape(y.shape).to(y.dtype))
        return torch.stack(restored)


def _lens_files(model_name: str, source: str | None) -> tuple[str, str]:
    """Paths of `params.pt` and `config.json` for `model_name`'s tuned lens.

    `source` may be a local folder holding them (or `lens/<model_name>/` under
    it); otherwise they come from the tuned-lens release on the hub.
    """
    if source is not None:
        folder = Path(source)
        for candidate in (folder, folder / "lens" / model_name):
            if (candidate / "params.pt").exists():
                return str(candidate / "params.pt"), str(candidate / "config.json")
        raise FileNotFoundError(
            f"no tuned lens params.pt in {folder} or {folder / 'lens' / model_name}"
        )
    if os.path.isdir(model_name) and (Path(model_name) / "lens" / "params.pt").exists():
        folder = Path(model_name) / "lens"
        return str(folder / "params.pt"), str(folder / "config.json")
    files = [
        hf_hub_download(TUNED_LENS_SPACE, f"lens/{model_name}/{name}", repo_type="space")
        for name in ("params.pt", "config.json")
    ]
    return files[0], files[1]


def load_tuned_lens(
    model_name: str, d_model: int, n_blocks: int, source: str | None = None
) -> TunedLens:
    """The tuned lens released for `model_name`, loaded without the `tuned-lens` package."""
    params_path, config_path = _lens_files(model_name, source)
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
        if config.get("d_model", d_model) != d_model:
            raise ValueError(
                f"the tuned lens at {config_path} is for d_model={config['d_model']}, not {d_model}"
            )
    lens = TunedLens(d_model, n_blocks)
    state = load_as_data(params_path, what="tuned lens")
    lens.layer_translators.load_state_dict(state)
    return lens
