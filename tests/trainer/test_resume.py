"""Killed runs resume where they stopped and end where an uninterrupted run ends."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.goldens import GOLDENS

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
ARGS = [
    "--model_name", str(GOLDENS / "tiny-gpt-neox-2"), "--path", str(GOLDENS / "corpus.jsonl.zst"),
    "--max_length", "32", "--batch_size", "2", "--accumulate_grad_batches", "2",
    "--expansion_factor", "4", "-k", "6", "--auxk", "16", "--lr", "1e-3",
    "--dead_tokens_threshold", "256", "--max_tokens", str(STEPS * 2 * 64),
    "--val_tokens", "128", "--limit_val_batches", "0", "--checkpoint_every_n_steps", "1",
    "--logger", "none", "--run", "run",
]  # fmt: skip


def environment() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    return env


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *ARGS, "--run_dir", str(run_dir), *extra]
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except Exception:
        return -1


def interrupt(run_dir: Path, signum: int, at_step: int) -> subprocess.CompletedProcess:
    """Start a run and send it `signum` once its last checkpoint reaches `at_step`."""
    last = run_dir / "run" / "checkpoints" / "last.ckpt"
    command = [sys.executable, str(ROOT / "train.py"), *ARGS, "--run_dir", str(run_dir)]
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and checkpoint_step(last) >= at_step:
            process.send_signal(signum)
            break
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


SLOW_STEPS = """
import time
from mlsae.model import MLSAETransformer

_training_step = MLSAETransformer.training_step


def slow_training_step(self, *args, **kwargs):
    time.sleep(0.2)
    return _training_step(self, *args, **kwargs)


MLSAETransformer.training_step = slow_training_step
"""


def kill_ahead_of_checkpoint(run_dir: Path, at_batch: int, *extra: str) -> int:
    """Start a run whose micro-batches take 0.2 s longer (so that the kill lands between
    two checkpoints), SIGKILL it once its progress bar (on stdout) passes micro-batch
    `at_batch`, and return the step of its last checkpoint."""
    slow = run_dir / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**environment(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{slow}:{ROOT}"}
    command = [sys.executable, str(ROOT / "train.py"), *ARGS, "--run_dir", str(run_dir), *extra]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(iter(lambda: process.stdout.read(64), ""))
    )
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        batches = [int(n) for n in re.findall(r"\| *(\d+)/", "".join(output))]
        if batches and max(batches) >= at_batch:
            process.kill()
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    reader.join(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(output)[-3000:]
    return checkpoint_step(run_dir / "run" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours = load_file(resumed / "run" / "model" / "model.safetensors")
    theirs = load_file(reference / "run" / "model" / "model.safetensors")
    for name in theirs:
        if name.startswith("autoencoder."):
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    state = torch.load(resumed / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    reference_state = torch.load(reference / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == reference_state["global_step"] == STEPS
    assert state["mlsae"] == reference_state["mlsae"]
    assert state["mlsae"]["tokens_seen"] == STEPS * 2 * 64


def test_resume_after_sigkill(uninterrupted, tmp_path):
    killed = interrupt(tmp_path, signal.SIGKILL, at_step=5)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert 5 <= checkpoint_step(last) < STEPS
    resumed = train(tmp_path, "--checkpoint_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted)


def test_resume_after_a_kill_that_loses_several_steps(uninterrupted, tmp_path):
    cadence = ["--checkpoint_every_n_steps", "4"]
    step = kill_ahead_of_checkpoint(tmp_path, 15, *cadence)  # 2 micro-batches per step
    assert step == 4, step  # steps 5 to 7 were trained, then lost
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train(tmp_path, *cadence, "--checkpoint_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_a_checkpoint_then_resumes(uninterrupted, tmp_path):
    stopped = interrupt(tmp_path, signal.SIGTERM, at_step=3)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step = checkpoint_step(last)
    assert f"Stopped by SIGTERM after step {step}: saved {last}" in stopped.stderr
    assert f"resume with --checkpoint_path {last}" in stopped.stderr
    assert not (tmp_path / "run" / "model").exists()
    resumed = train(tmp_path, "--checkpoint_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted)


def test_checkpoints_are_written_atomically(tmp_path):
    from mlsae.trainer.faults import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    class Exploding:
        def __reduce__(self):
            raise RuntimeError("crash while saving")

    with pytest.raises(RuntimeError, match="crash while saving"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "bad": Exploding()}, target)
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(2))
    shutil.copy(target, tmp_path / "truncated.ckpt")
    with open(tmp_path / "truncated.ckpt", "r+b") as file:
        file.truncate(20)
    with pytest.raises(ValueError, match="truncated.ckpt"):
        io.load_checkpoint(tmp_path / "truncated.ckpt")
