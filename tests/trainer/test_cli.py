"""The commands, run as a user runs them: in subprocesses, offline, on the tiny golden model."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlsae.model.metric_sets import COMPARISON_GROUPS
from tests.goldens import GOLDENS

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model_name", "tiny-gpt-neox-2", "--expansion_factor", "8", "-k", "6"]
DATA = ["--max_length", "32", "--batch_size", "2"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder laid out like the original's runs: the model, data/ and a local repo id."""
    shutil.copytree(GOLDENS / "tiny-gpt-neox-2", tmp_path / "tiny-gpt-neox-2")
    (tmp_path / "data").mkdir()
    shutil.copy(GOLDENS / "corpus.jsonl.zst", tmp_path / "data" / "test.jsonl.zst")
    published = tmp_path / "tim-lawson" / "mlsae-tiny-gpt-neox-2-x8-k6-tfm"
    shutil.copytree(GOLDENS / "mlsae-tfm-trained", published)
    for path in tmp_path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tmp_path


def run(script: str, args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("HF_TOKEN", None)
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


TRAIN = [
    *COMMON,
    *DATA,
    "--path", "data/test.jsonl.zst", "--split", "test",
    "--accumulate_grad_batches", "1", "--lr", "1e-3", "--dead_tokens_threshold", "2000",
    "--val_tokens", "256", "--limit_val_batches", "2", "--val_check_interval", "4",
    "--checkpoint_every_n_steps", "4", "--run", "tiny",
]  # fmt: skip


def test_train_resume_and_upload(workdir: Path, tmp_path: Path):
    first = run("train.py", [*TRAIN, "--max_tokens", str(8 * 64)], workdir, tmp_path)
    output = workdir / "out" / "runs" / "tiny" / "model"
    assert (
        first.stdout.strip().splitlines()[-1]
        == f"Saved the trained model to {output.relative_to(workdir)}"
    )
    assert (output / "model.safetensors").exists()
    assert json.loads((output / "config.json").read_text())["k"] == 6
    assert "val/fvu/avg" in first.stdout

    last = workdir / "out" / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8
    assert checkpoint["mlsae"]["tokens_seen"] == 8 * 64

    run(
        "train.py",
        [*TRAIN, "--max_tokens", str(12 * 64), "--checkpoint_path", str(last)],
        workdir,
        tmp_path,
    )
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 12
    assert checkpoint["mlsae"]["tokens_seen"] == 12 * 64
    assert checkpoint["mlsae"]["micro_batches_seen"] == 12

    # Trained on a local folder: the published config names the hub id given.
    hub_id = ["--model_name", "someone/tiny-gpt-neox-2"]
    uploaded = run("upload.py", ["--ckpt_path", str(last), *hub_id], workdir, tmp_path)
    assert "nothing was pushed" in uploaded.stdout
    tfm = workdir / "out" / "upload" / "mlsae-tiny-gpt-neox-2-x8-k6-tfm"
    sae = workdir / "out" / "upload" / "mlsae-tiny-gpt-neox-2-x8-k6"
    assert "transformer" not in json.loads((sae / "config.json").read_text())
    assert json.loads((tfm / "config.json").read_text())["model_name"] == hub_id[1]
    from mlsae.model import MLSAE
    from mlsae.model.lightning import MLSAETransformer

    model = MLSAETransformer.from_pretrained(tfm, model_name=str(workdir / "tiny-gpt-neox-2"))
    plain = MLSAE.from_pretrained(sae)
    assert torch.equal(plain.encoder.weight, model.autoencoder.encoder.weight)


def test_test_reproduces_the_original_csv(workdir: Path, tmp_path: Path):
    args = [*COMMON, *DATA, "--max_tokens", "256", "--precision", "32"]
    run("test.py", [*args, "--count_special_tokens", "true"], workdir, tmp_path)
    written = workdir / "out" / "test_mlsae-tiny-gpt-neox-2-x8-k6-tfm.csv"
    with open(written) as file:
        ours = next(csv.DictReader(file))
    with open(GOLDENS / "test_output.csv") as file:
        original = next(csv.DictReader(file))
    assert list(ours)[: len(original)] == list(original)
    # The columns that compare with SAELens and SAEBench come last, in their own order.
    layers = [f"layer_{i}" for i in range(len([c for c in original if "train/fvu/" in c]) - 1)]
    compared = [f"{group}/{last}" for group in COMPARISON_GROUPS for last in [*layers, "avg"]]
    assert list(ours)[-len(compared) :] == compared
    assert 0.0 < float(ours["train/explained_variance/avg"]) < 1.0
    for column, value in original.items():
        if column in ("loss/auxk", "loss/total"):
            continue  # AuxK's definition changed (DESIGN.md fault 7)
        assert float(ours[column]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), column


def test_test_without_the_test_split_says_how_to_get_it(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "test.py"), "--repo_id", str(GOLDENS / "mlsae-tfm-trained")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "data/test.jsonl.zst does not exist" in result.stderr
    assert "--path" in result.stderr


def test_help_documents_every_option():
    for script in ("train.py", "test.py", "upload.py"):
        result = subprocess.run(
            [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0
        assert "default" in result.stdout
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True
    )
    for flag in ("--model_name", "--layers", "--expansion_factor", "-k", "--path",
                 "--max_tokens", "--max_length", "--batch_size", "--accumulate_grad_batches",
                 "--precision", "--checkpoint_path", "--seed", "--devices", "--strategy",
                 "--output_dir"):  # fmt: skip
        assert flag in result.stdout, flag
