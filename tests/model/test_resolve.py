"""Loading saved models: what a folder holds, where a saved model's language model is found,
and what a saved or pushed config stores of it (docs/models.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mlsae.cli import ConfigError, run_command
from mlsae.model import MLSAE
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.resolve import (
    LanguageModelNotFoundError,
    WrongKindError,
    find_language_model,
    portable_path,
    saved_kind,
)
from tests.goldens import GOLDENS

TINY = GOLDENS / "tiny-gpt-neox-2"
TFM = GOLDENS / "mlsae-tfm-trained"
SAE = GOLDENS / "mlsae-ae-trained"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_saved_kinds_come_from_config_keys():
    assert saved_kind(read_json(TINY / "config.json")) == "language model"
    assert saved_kind(read_json(TFM / "config.json")) == "MLSAETransformer"
    assert saved_kind(read_json(SAE / "config.json")) == "MLSAE"
    assert saved_kind({"hidden": 3}) is None


@pytest.mark.parametrize(
    ("loader", "folder", "message"),
    [
        (
            MLSAETransformer,
            SAE,
            "is a plain MLSAE, without its language model: load it with MLSAE.from_pretrained",
        ),
        (
            MLSAE,
            TFM,
            "is an MLSAETransformer (an MLSAE with its language model): load it with "
            "MLSAETransformer.from_pretrained",
        ),
        (
            MLSAETransformer,
            TINY,
            "is a Hugging Face language model, not an MLSAE: pass it as --model_name",
        ),
        (MLSAE, TINY, "is a Hugging Face language model"),
    ],
)
def test_a_folder_of_another_kind_says_how_to_load_it(loader, folder, message, recwarn):
    with pytest.raises(WrongKindError) as error:
        loader.from_pretrained(folder)
    assert str(error.value).startswith(f"{folder} {message}")
    assert not [w for w in recwarn if "config keys" in str(w.message)]


def lm_folders(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)


def test_a_stored_name_is_found_from_the_working_directory_first(tmp_path, monkeypatch):
    lm_folders(tmp_path, "lm", "runs/model/lm")
    monkeypatch.chdir(tmp_path)
    assert find_language_model("lm", "runs/model") == "lm"


def test_then_relative_to_the_model_folder(tmp_path, monkeypatch):
    lm_folders(tmp_path, "lms/tiny", "runs/r/model", "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = str(tmp_path / "runs" / "r" / "model")
    assert find_language_model("../../../lms/tiny", model) == str(tmp_path / "lms" / "tiny")


def test_then_as_a_hub_id(tmp_path, monkeypatch):
    lm_folders(tmp_path, "model")
    monkeypatch.chdir(tmp_path)
    assert find_language_model("EleutherAI/pythia-70m", "model") == "EleutherAI/pythia-70m"


@pytest.mark.parametrize("stored", ["../../quickstart/model", "/nowhere/lm", "a b"])
def test_a_name_found_nowhere_suggests_model_name(tmp_path, monkeypatch, stored):
    lm_folders(tmp_path, "model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LanguageModelNotFoundError) as error:
        find_language_model(stored, "model")
    assert f"cannot find the language model {stored!r} that model was trained on" in str(
        error.value
    )
    assert "--model_name (commands) or model_name= (Python)" in str(error.value)


def test_portable_paths_are_relative_to_the_saved_folder(tmp_path, monkeypatch):
    lm_folders(tmp_path, "lms/tiny")
    monkeypatch.chdir(tmp_path)
    assert portable_path("lms/tiny", "out/runs/r/model") == "../../../../lms/tiny"
    assert portable_path(str(tmp_path / "lms" / "tiny"), tmp_path / "m") == "../lms/tiny"
    assert portable_path("EleutherAI/pythia-70m", "out/m") == "EleutherAI/pythia-70m"


@pytest.fixture
def saved_elsewhere(tmp_path, monkeypatch):
    """The golden model saved to `runs/r/model`, its language model at `lms/tiny`, loaded
    from the folder `elsewhere` (all under `tmp_path`)."""
    shutil.copytree(TINY, tmp_path / "lms" / "tiny")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    model = MLSAETransformer.from_pretrained(TFM, model_name="lms/tiny")
    model.save_pretrained("runs/r/model")
    monkeypatch.chdir(tmp_path / "elsewhere")
    return model, tmp_path / "runs" / "r" / "model"


def test_a_saved_model_loads_from_any_working_directory(saved_elsewhere, tmp_path):
    model, folder = saved_elsewhere
    assert read_json(folder / "config.json")["model_name"] == "../../../lms/tiny"
    loaded = MLSAETransformer.from_pretrained(folder)
    assert loaded.model_name == str(tmp_path / "lms" / "tiny")
    assert torch.equal(loaded.autoencoder.encoder.weight, model.autoencoder.encoder.weight)
    tokens = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(
        loaded.residual_stream(tokens).raw, model.residual_stream(tokens).raw
    )


def test_saving_never_stores_an_absolute_path(tmp_path, monkeypatch):
    shutil.copytree(TINY, tmp_path / "tiny")
    model = MLSAETransformer.from_pretrained(TFM, model_name=str(tmp_path / "tiny"))
    model.save_pretrained(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_text()
    assert str(tmp_path) not in config
    assert read_json(tmp_path / "saved" / "config.json")["model_name"] == "../tiny"


def test_the_golden_name_is_found_from_the_working_directory(monkeypatch):
    monkeypatch.chdir(GOLDENS)
    model = MLSAETransformer.from_pretrained(TFM)
    assert model.model_name == "tiny-gpt-neox-2"


def test_a_stored_hub_id_without_the_hub_suggests_model_name(
    capsys, tmp_path, monkeypatch, unreachable_hub
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: MLSAETransformer.from_pretrained(TFM))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: cannot load the language model 'tiny-gpt-neox-2': ")
    assert "--model_name (model_name= in Python)" in line and "\n" not in line
    assert unreachable_hub == ["huggingface.co"]


def test_a_stored_local_path_found_nowhere_fails_without_the_hub(
    saved_elsewhere, tmp_path, unreachable_hub
):
    _, folder = saved_elsewhere
    shutil.rmtree(tmp_path / "lms")
    with pytest.raises(LanguageModelNotFoundError, match="'../../../lms/tiny'"):
        MLSAETransformer.from_pretrained(folder)
    assert unreachable_hub == []


def test_a_config_that_names_a_local_folder_is_never_pushed(tmp_path, monkeypatch, unreachable_hub):
    shutil.copytree(TINY, tmp_path / "lms" / "tiny")
    monkeypatch.chdir(tmp_path)
    model = MLSAETransformer.from_pretrained(TFM, model_name="lms/tiny")
    with pytest.raises(ConfigError, match="names local paths .*model_name='lms/tiny'"):
        model.push_to_hub("someone/mlsae-tiny-tfm")
    assert unreachable_hub == []
