"""`train.py --expansion_factor 2 4`: a sweep of SAEs on one forward pass of the transformer,
bit for bit the separate runs of the same SAEs, each in its own run folder; resumed from the
step every SAE committed; wrong sweeps refused in one line."""

import importlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.faults import TrainingInterrupted
from mlsae.trainer.sweep_options import sweep_members
from tests.goldens import GOLDENS
from tests.trainer.test_errors import fails_with

train_command = importlib.import_module("mlsae.trainer.train")
sweep_module = importlib.import_module("mlsae.trainer.sweep")

STEPS = 4
TINY, CORPUS = str(GOLDENS / "tiny-gpt-neox-2"), str(GOLDENS / "corpus.jsonl.zst")
BASE = ["--model_name", TINY, "--path", CORPUS,
        "--max_length", "32", "--batch_size", "2", "--auxk", "8", "--accumulate_grad_batches", "2",
        "--lr", "1e-3", "--dead_tokens_threshold", "256", "--val_tokens", "64",
        "--limit_val_batches", "1", "--checkpoint_every_n_steps", "1", "--logger", "none",
        "--max_tokens", str(STEPS * 2 * 64)]  # fmt: skip
SWEEP = ["--expansion_factor", "2", "4", "-k", "4", "--run", "run"]
NAMES = ["run-x2", "run-x4"]


def args_for(run_dir: Path, *extra: str) -> list[str]:
    return [*BASE, "--run_dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def separate(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("separate")
    for name, factor in zip(NAMES, ("2", "4"), strict=True):
        train_command.main(
            args_for(run_dir, "--expansion_factor", factor, "-k", "4", "--run", name)
        )
    return run_dir


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("swept")
    train_command.main(args_for(run_dir, *SWEEP))
    return run_dir


def assert_same_runs(ours: Path, theirs: Path, steps: int = STEPS) -> None:
    for name in NAMES:
        a = load_file(ours / name / "model" / "model.safetensors")
        b = load_file(theirs / name / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]), (name, key)
        a = torch.load(ours / name / "checkpoints" / "last.ckpt", weights_only=True)
        b = torch.load(theirs / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert a["global_step"] == b["global_step"] == steps
        assert a["mlsae"] == b["mlsae"]
        for key, value in b["state_dict"].items():
            assert torch.equal(a["state_dict"][key], value), (name, key)
        assert_equal_nested(a["optimizer_states"], b["optimizer_states"], name)
        assert a["lr_schedulers"] == b["lr_schedulers"]


def assert_equal_nested(a, b, where) -> None:
    if isinstance(b, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in b:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_sweep_equals_separate_runs_bit_for_bit(swept, separate):
    assert_same_runs(swept, separate)
    for name in NAMES:
        model = MLSAETransformer.from_pretrained(swept / name / "model")
        assert model.expansion_factor == int(name[-1])
    marker = json.loads((swept / "run" / "checkpoints" / "committed.json").read_text())
    assert marker == {"step": STEPS, "runs": NAMES}
    assert [p.name for p in (swept / "run" / "checkpoints").glob("step=*")] == [f"step={STEPS}"]
    for name in NAMES:
        # The run's checkpoint of the committed step is the sweep's file, not a second write.
        committed = swept / "run" / "checkpoints" / f"step={STEPS}" / f"{name}.ckpt"
        last = swept / name / "checkpoints" / "last.ckpt"
        assert committed.stat().st_ino == last.stat().st_ino


def test_names_and_lists():
    members, _ = sweep_members([*BASE, "--expansion_factor", "2", "4", "-k", "4", "8"])
    names = [m.name for m in members]
    assert names == [f"mlsae-tiny-gpt-neox-2-x{e}-k{k}" for e in (2, 4) for k in (4, 8)]
    members, _ = sweep_members([*BASE, "-k", "4", "8", "--lr", "1e-3", "3e-4", "--run", "r"])
    assert [m.name for m in members] == ["r-k4-lr1e-3", "r-k4-lr3e-4", "r-k8-lr1e-3", "r-k8-lr3e-4"]
    assert members[1].config.autoencoder.lr == 3e-4 and members[2].config.autoencoder.k == 8


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["-k", "4", "4"], "two SAEs the run name"),
        (["-k", "4", "200"], "-x2-k200: "),
        (["-k", "4", "8", "--output_dir", "x"], "--output_dir names one run's outputs"),
    ],
)
def test_wrong_sweeps_are_one_error_line(capsys, tmp_path, extra, fragment):
    error = fails_with(
        capsys, train_command.main, args_for(tmp_path, "--expansion_factor", "2", *extra), fragment
    )
    assert error.strip().count("\n") == 0


class SigtermAt(Callback):
    """Sends this process SIGTERM when the first SAE starts step `step` + 1, and waits for
    the sweep's handler (in the main thread) to see it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        member = next(
            c for c in trainer.callbacks if isinstance(c, sweep_module.SweepMemberCallback)
        )
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not member.sweep.stop_requested and time.monotonic() < deadline:
            time.sleep(0.01)


class FailAt(Callback):
    """Fails before the last micro-batch of step `step` + 1 (the SAEs before it saved it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and (batch_idx + 1) % 2 == 0:
            raise RuntimeError("killed")


def test_a_stopped_or_killed_sweep_resumes_every_sae_from_the_same_step(swept, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    args = args_for(tmp_path, *SWEEP)
    sigterm = lambda index, name: [SigtermAt(1)] if index == 0 else []  # noqa: E731
    with pytest.raises(TrainingInterrupted, match=f"resume with --checkpoint_path {checkpoints}"):
        sweep_module.train_sweep(args, sigterm)
    assert json.loads((checkpoints / "committed.json").read_text())["step"] == 2
    for name in NAMES:
        last = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 2
        assert not (tmp_path / name / "model").exists()

    resume = [*args, "--checkpoint_path", str(checkpoints)]
    fail = lambda index, name: [FailAt(2)] if index == 1 else []  # noqa: E731
    with pytest.raises(RuntimeError, match="killed"):
        sweep_module.train_sweep(resume, fail)
    # The first SAE saved step 3, the second did not: step 2 stays the committed one.
    assert json.loads((checkpoints / "committed.json").read_text())["step"] == 2
    assert [p.name for p in (checkpoints / "step=3").iterdir()] == ["run-x2.ckpt"]

    train_command.main(resume)
    assert not (checkpoints / "step=2").exists()
    assert_same_runs(tmp_path, swept)


def test_a_sweep_resumes_from_its_folder_only(capsys, swept, tmp_path):
    last = swept / "run-x2" / "checkpoints" / "last.ckpt"
    args = args_for(tmp_path, *SWEEP, "--checkpoint_path", str(last))
    fails_with(capsys, train_command.main, args, "takes the sweep's checkpoint folder")
