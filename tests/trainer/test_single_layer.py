"""A single-layer SAE (`--layers L`), any architecture and site: trained from the command
line, evaluated by `test.py`, loaded through `mlsae.saes` and exported for SAELens."""

import csv
import importlib
import json

import pytest

from mlsae.saes import load_sae
from mlsae.saes.export import main as export_main
from tests.goldens import GOLDENS

train_command = importlib.import_module("mlsae.trainer.train")
test_command = importlib.import_module("mlsae.trainer.test")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")


@pytest.mark.parametrize(
    "architecture", [["--architecture", "batchtopk"], ["--architecture", "matryoshka"]]
)
def test_a_single_layer_sae_at_another_site(tmp_path, architecture):
    args = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
            "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--max_tokens", "192",
            "--val_tokens", "64", "--limit_val_batches", "1", "--logger", "none",
            "--layers", "1", "--site", "resid_pre", "--run_dir", str(tmp_path / "runs"),
            *architecture]  # fmt: skip
    train_command.main(args)
    name = f"mlsae-tiny-gpt-neox-2-x2-k4-{architecture[1]}-resid_pre-layers-1"
    model = tmp_path / "runs" / name / "model"
    assert json.loads((model / "config.json").read_text())["layers"] == [1]

    test_args = ["--repo_id", str(model), "--path", CORPUS, "--split", "test", "--max_length",
                 "32", "--batch_size", "2", "--max_tokens", "128",
                 "--output_dir", str(tmp_path)]  # fmt: skip
    (written,) = test_command.main(test_args)
    with open(written) as file:
        row = next(csv.DictReader(file))
    assert row["train/fvu/layer_1"] == row["train/fvu/avg"]
    assert not any("layer_0" in column for column in row)

    sae = load_sae(model)
    assert (sae.layer, sae.site) == (1, "resid_pre")
    export_main(["--repo_id", str(model), "--layer", "1", "--output_dir", str(tmp_path / "out")])
    exported = load_sae(tmp_path / "out")
    assert (exported.layer, exported.site, exported.format) == (1, "resid_pre", "saelens")
