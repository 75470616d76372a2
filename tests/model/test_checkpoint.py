"""Pickled files are read as data: nothing in a checkpoint or weights file runs code."""

import os
from pathlib import Path

import pytest
import torch

from mlsae.model import MLSAE
from mlsae.model.checkpoint import CheckpointError, load_as_data, read_checkpoint


class CodeOnLoad:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_plain_data_loads(tmp_path):
    data = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 2, "name": "x", "list": [1.5]}
    torch.save(data, tmp_path / "plain.ckpt")
    loaded = read_checkpoint(tmp_path / "plain.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], data["state_dict"]["w"])
    assert loaded["epoch"] == 2 and loaded["list"] == [1.5]


def test_objects_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "payload": CodeOnLoad(marker)}, tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load .*hostile.ckpt") as error:
        read_checkpoint(tmp_path / "hostile.ckpt")
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(64)}}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.ckpt: it is corrupt or truncated"):
        read_checkpoint(tmp_path / "cut.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "list.ckpt")
    with pytest.raises(FileNotFoundError):
        load_as_data(tmp_path / "missing.bin")


def test_a_pickled_weights_file_of_a_hub_model_runs_no_code(tmp_path):
    sae = MLSAE(8, 16, 2, auxk=4)
    sae.save_pretrained(tmp_path / "sae")
    os.remove(tmp_path / "sae" / "model.safetensors")
    marker = tmp_path / "code-ran"
    state = {**sae.state_dict(), "payload": CodeOnLoad(marker)}
    torch.save(state, tmp_path / "sae" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin"):
        MLSAE.from_pretrained(tmp_path / "sae")
    assert not marker.exists()
    torch.save(sae.state_dict(), tmp_path / "sae" / "pytorch_model.bin")
    loaded = MLSAE.from_pretrained(tmp_path / "sae")
    assert torch.equal(loaded.encoder.weight, sae.encoder.weight)
