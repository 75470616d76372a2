"""The README's quick start, shortened: train on the shipped model and corpus, then test."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

QUICKSTART_TRAIN = [
    "--model_name", "quickstart/model", "--path", "quickstart/data",
    "--val_path", "quickstart/data", "--max_length", "128", "--batch_size", "8",
    "--accumulate_grad_batches", "1", "--expansion_factor", "16", "-k", "16", "--auxk", "64",
    "--lr", "1e-3", "--dead_tokens_threshold", "100000", "--val_check_interval", "64",
    "--limit_val_batches", "8",
]  # fmt: skip


def test_quickstart_train_then_test(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "runs"
    train = subprocess.run(
        [sys.executable, "train.py", *QUICKSTART_TRAIN, "--max_tokens", str(12 * 1024),
         "--limit_val_batches", "2", "--run_dir", str(run_dir), "--run", "quickstart"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    model_dir = run_dir / "quickstart" / "model"
    assert train.stdout.strip().splitlines()[-1] == f"Saved the trained model to {model_dir}"
    test = subprocess.run(
        [sys.executable, "test.py", "--repo_id", str(model_dir), "--path", "quickstart/data",
         "--split", "test", "--max_length", "128", "--batch_size", "8",
         "--max_tokens", str(2 * 1024), "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr[-4000:]
    with open(tmp_path / "out" / "test_quickstart.csv") as file:
        row = next(csv.DictReader(file))
    assert 0 < float(row["train/fvu/avg"]) < 1
    assert float(row["val/loss/delta/avg"]) > 0
