"""The one command of the README's quick start, shortened: `scripts/quickstart.sh` trains,
evaluates, analyses and plots, and says where each output went."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script(tmp_path: Path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHON": sys.executable}
    env.pop("WANDB_API_KEY", None)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--no-install", "--tokens", "8192", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = out / "runs" / "quickstart" / "model"
    assert (model / "model.safetensors").is_file() and (model / "README.md").is_file()
    with open(out / "test_quickstart.csv") as file:
        row = next(csv.DictReader(file))
    assert 0 < float(row["train/fvu/avg"]) < 1 and float(row["val/loss/delta/avg"]) > 0
    with safe_open(out / "quickstart-dists.safetensors", "pt") as dists:
        # the positions that count: 8,192 tokens less the documents' EOS separators
        assert 7000 < int(dists.metadata()["mlsae.tokens"]) < 8192
    assert (out / "figures" / "dists_heatmap_quickstart.png").stat().st_size > 10_000
    for line in (str(model), f"{out}/test_quickstart.csv", "dists_heatmap_quickstart.png"):
        assert line in result.stdout


def test_quickstart_script_refuses_an_unknown_option():
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--tokenz", "5"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: unknown option --tokenz")


def test_quickstart_script_passes_the_architecture_and_train_args(tmp_path: Path):
    """`--architecture` and everything after `--` reach train.py (a stand-in Python
    records its arguments; nothing runs)."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    command = ["bash", "scripts/quickstart.sh", "--no-install", "--out", str(tmp_path / "out")]
    command += ["--architecture", "matryoshka", "--", "--matryoshka_widths", "128", "512"]
    env = {**os.environ, "PYTHON": str(fake)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train = next(line for line in calls.read_text().splitlines() if line.startswith("train.py"))
    assert train.endswith("--architecture matryoshka --matryoshka_widths 128 512")
    assert "Training a matryoshka MLSAE" in result.stdout
