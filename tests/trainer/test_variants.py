"""`train.py --architecture`: a few steps of each architecture from the command line, the model
reloaded strictly and evaluated by `test.py`, TopK's saved config unchanged, resumes that
change the architecture refused and wrong options refused in one line."""

import csv
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mlsae.model.hparams import MLSAEHyperparameters
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS
from tests.trainer.test_errors import fails_with

train_command = importlib.import_module("mlsae.trainer.train")
test_command = importlib.import_module("mlsae.trainer.test")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
STEPS = 3
N_LATENTS = 96  # 2 x the tiny model's width
BASE = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "2",
        "--val_tokens", "64", "--limit_val_batches", "1", "--checkpoint_every_n_steps", "1",
        "--logger", "none", "--run", "run"]  # fmt: skip
ARCHITECTURES = {
    "topk": [],
    "batchtopk": ["--architecture", "batchtopk", "--batchtopk_pool", "layer"],
    "matryoshka": ["--architecture", "matryoshka", "--matryoshka_widths", "16", "48"],
}


def args_for(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*BASE, "--run_dir", str(run_dir), "--max_tokens", str(steps * 2 * 64), *extra]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    architecture = request.param
    run_dir = tmp_path_factory.mktemp(f"trained-{architecture}")
    train_command.main(args_for(run_dir, STEPS, *ARCHITECTURES[architecture]))
    return architecture, run_dir


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "run" / "checkpoints" / "last.ckpt"


def test_the_model_reloads_strictly_with_its_architecture(trained):
    architecture, run_dir = trained
    output = run_dir / "run" / "model"
    config = json.loads((output / "config.json").read_text())
    model = MLSAETransformer.from_pretrained(output)
    autoencoder = model.autoencoder
    assert autoencoder.architecture == model.architecture == architecture
    checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    state = checkpoint["state_dict"]
    if architecture == "topk":
        # Exactly the published keys, as before the other architectures existed.
        assert set(config) == set(MLSAEHyperparameters.PUBLISHED)
        assert "autoencoder.batchtopk_threshold" not in state
        assert not hasattr(autoencoder, "batchtopk_threshold")
        return
    assert config["architecture"] == architecture
    threshold = state["autoencoder.batchtopk_threshold"]
    assert threshold.dtype == torch.float64 and 0 < threshold.item() < 1
    assert torch.equal(autoencoder.batchtopk_threshold, threshold)
    if architecture == "batchtopk":
        assert config["batchtopk_pool"] == "layer"
        assert autoencoder.variant.capacity == 16
    else:
        assert config["matryoshka_widths"] == [16, 48]
        assert autoencoder.variant.widths == (16, 48, N_LATENTS)
        assert "matryoshka_selection" not in config  # the default


def test_test_reports_the_architectures_metrics(trained, tmp_path: Path):
    architecture, run_dir = trained
    args = ["--repo_id", str(run_dir / "run" / "model"), "--path", CORPUS, "--split", "test"]
    args += ["--max_length", "32", "--batch_size", "2", "--max_tokens", "128"]
    (written,) = test_command.main([*args, "--output_dir", str(tmp_path)])
    with open(written) as file:
        row = next(csv.DictReader(file))
    columns = ["train/fvu/avg", "train/l0/avg", "train/l0/std/avg", "train/l0/std/layer_3"]
    if architecture == "matryoshka":
        columns += ["train/fvu/prefix_16", "train/fvu/prefix_48", f"train/fvu/prefix_{N_LATENTS}"]
        assert float(row["train/fvu/prefix_16"]) > float(row["train/fvu/avg"])
        assert float(row[f"train/fvu/prefix_{N_LATENTS}"]) == pytest.approx(
            float(row["train/fvu/avg"]), rel=1e-5
        )
    if architecture != "topk":
        columns.append("train/batchtopk/capped")
    for column in columns:
        assert math.isfinite(float(row[column])), column
    assert not any("prefix" in c for c in row) or architecture == "matryoshka"
    assert ("train/batchtopk/capped" in row) == (architecture != "topk")
    # The original's columns first, the new ones after.
    names = list(row)
    assert names.index("train/l0/std/avg") > names.index("val/loss/delta/avg")


def test_resume_refuses_another_architecture(capsys, trained, tmp_path: Path):
    architecture, run_dir = trained
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs)
    other = "topk" if architecture != "topk" else "batchtopk"
    resume = ["--checkpoint_path", str(last_checkpoint(runs)), "--architecture", other]
    fails_with(
        capsys,
        train_command.main,
        args_for(runs, STEPS + 1, *resume),
        "cannot resume",
        f"--architecture was {architecture}, now {other}",
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--architecture", "jumprelu"], "--architecture must be one of topk, batchtopk"),
        (["--architecture", "matryoshka", "--matryoshka_widths", "48", "16"], "must increase"),
        (["--architecture", "matryoshka", "--matryoshka_widths", "200"], "n_latents (96)"),
        (["--matryoshka_widths", "16"], "--matryoshka_widths applies to --architecture"),
        (["--architecture", "batchtopk", "--batchtopk_capacity", "2"], "at least k (4)"),
        (["--batchtopk_pool", "layer"], "--batchtopk_capacity and --batchtopk_pool apply"),
    ],
)
def test_wrong_options_are_one_error_line(capsys, tmp_path: Path, extra, fragment):
    error = fails_with(capsys, train_command.main, args_for(tmp_path, 1, *extra), fragment)
    assert error.strip().count("\n") == 0
