"""upload.py publishes a config that others can load: the language model as a hub id."""

import importlib
import json
import shutil

import pytest
import torch

from mlsae.cli import run_command
from mlsae.model import MLSAE
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.config import UploadConfig
from tests.goldens import GOLDENS

upload_command = importlib.import_module("mlsae.trainer.upload")

TFM_NAME = "mlsae-tiny-gpt-neox-2-x8-k6-tfm"


@pytest.fixture
def checkpoint(tmp_path, monkeypatch, unreachable_hub):
    """A Lightning checkpoint of the golden model, trained on the local folder
    `tiny-gpt-neox-2` of the working directory; no hub token."""
    shutil.copytree(GOLDENS / "tiny-gpt-neox-2", tmp_path / "tiny-gpt-neox-2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(upload_command, "get_token", lambda: None)
    model = MLSAETransformer.from_pretrained(
        GOLDENS / "mlsae-tfm-trained", model_name="tiny-gpt-neox-2"
    )
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


def upload_config(checkpoint, model_name=None) -> UploadConfig:
    config = UploadConfig(ckpt_path=str(checkpoint), output_dir="out/upload")
    if model_name is not None:
        config.model_name = model_name  # `--model_name`
    return config


def fails_with(capsys, config) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: upload_command.upload(config))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


def test_a_local_language_model_needs_its_hub_id(capsys, checkpoint, tmp_path):
    line = fails_with(capsys, upload_config(checkpoint))
    assert line == (
        "error: the model was trained on the local folder tiny-gpt-neox-2, which nobody else "
        "can load: pass the hub id of that language model with --model_name (e.g. "
        "--model_name EleutherAI/pythia-70m-deduped)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_name", ["tiny-gpt-neox-2", "./elsewhere", "not an id"])
def test_model_name_must_be_a_hub_id(capsys, checkpoint, model_name):
    line = fails_with(capsys, upload_config(checkpoint, model_name))
    assert line.startswith(f"error: --model_name {model_name} is not a hub id")


def test_the_published_config_names_the_hub_id(checkpoint, tmp_path, unreachable_hub):
    tfm_dir, sae_dir = upload_command.upload(upload_config(checkpoint, "someone/tiny-gpt-neox-2"))
    assert tfm_dir.resolve() == tmp_path / "out" / "upload" / TFM_NAME
    config_text = (tfm_dir / "config.json").read_text()
    config = json.loads(config_text)
    assert config["model_name"] == "someone/tiny-gpt-neox-2"
    assert "tuned_lens_path" not in config and str(tmp_path) not in config_text
    model = MLSAETransformer.from_pretrained(tfm_dir, model_name="tiny-gpt-neox-2")
    plain = MLSAE.from_pretrained(sae_dir)
    assert torch.equal(plain.encoder.weight, model.autoencoder.encoder.weight)
    assert unreachable_hub == []
