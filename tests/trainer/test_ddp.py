"""`train.py --devices 2 --strategy ddp` (gloo, on the CPU) with `--accumulate_grad_batches a`
trains the model that one process accumulating `2a` micro-batches trains on the same data:
the same weights, BatchTopK threshold and dead-latent state after every optimizer step.

Why they agree: rank r of 2 reads micro-batches r, r + 2, ... of the stream
(`mlsae.lm.data._shard`), so an optimizer step of the two ranks reads the 2a consecutive
micro-batches that the one process reads. Each micro-batch is its own BatchTopK pool in
both runs; the threshold's minimum is taken over the step's micro-batches and then over the
ranks (a MIN all-reduce), the firing counts are summed over the ranks, and DDP's average of
the ranks' gradients (each already divided by a) is the accumulation's sum divided by 2a.

The learning-rate schedule spans the optimizer steps each process takes (`max_steps` counts
the processes), and a stream whose micro-batches the ranks cannot share evenly ends at the
last whole round, so that no rank waits for a step the other never takes.
"""

import importlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file

from mlsae.trainer.config import RunConfig, parse
from tests.goldens import GOLDENS

train_module = importlib.import_module("mlsae.trainer.train")

ROOT = GOLDENS.parents[2]
STEPS = 3
ACCUMULATE = 2  # per rank; the single process accumulates twice as many
RUNS = {
    "batchtopk": ["--architecture", "batchtopk"],
    "topk": ["--architecture", "topk"],  # the control
}
UNEVEN = ["--architecture", "batchtopk", "--max_tokens", str((STEPS * 2 * ACCUMULATE + 1) * 64)]
"""One micro-batch more than the steps take, which only one of two ranks could read."""
# 384 latents and a dead-latent threshold below one step's tokens, so that some latents are
# dead after the first step and AuxK takes part; a large learning rate makes any difference
# between the runs show.
BASE = ["--model_name", str(GOLDENS / "tiny-gpt-neox-2"), "--path",
        str(GOLDENS / "corpus.jsonl.zst"), "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "8", "-k", "4", "--auxk", "8", "--lr", "1e-2",
        "--dead_tokens_threshold", "128", "--max_tokens", str(STEPS * 2 * ACCUMULATE * 64),
        "--val_tokens", "64", "--limit_val_batches", "1", "--accelerator", "cpu",
        "--precision", "32-true", "--logger", "none", "--run", "run"]  # fmt: skip

DDP_SCRIPT = textwrap.dedent(
    """
    # Lightning's DDP launcher runs this script again for rank 1.
    import sys
    sys.path.insert(0, {root!r})
    from tests.trainer.test_ddp import RUNS, train_and_record
    for run in RUNS:
        train_and_record({out!r}, run, devices=2)
    train_and_record({out!r}, "uneven", devices=2)
    """
)


class RecordSteps(Callback):
    """Each optimizer step's threshold and dead-latent state, and the final weights, of
    this rank, saved to `<folder>/rank<r>.safetensors` when training ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.steps):
            autoencoder = pl_module.autoencoder
            step = {"tokens_since_fired": autoencoder.tokens_since_fired.clone()}
            if autoencoder.variant.batchtopk:
                step["threshold"] = autoencoder.batchtopk_threshold.clone()
            self.steps.append(step)

    def on_train_end(self, trainer, pl_module) -> None:
        weights = pl_module.autoencoder.state_dict()
        state = {f"final/{name}": value.contiguous() for name, value in weights.items()}
        for name in self.steps[0]:
            state[f"steps/{name}"] = torch.stack([step[name] for step in self.steps])
        # The optimizer steps the learning-rate schedule decays over.
        state["schedule/total_steps"] = torch.tensor(trainer.estimated_stepping_batches)
        save_file(state, self.folder / f"rank{trainer.global_rank}.safetensors")


def train_and_record(out: str, run: str, devices: int) -> None:
    """Train `run` on `devices` processes, each accumulating `ACCUMULATE * 2 / devices`
    micro-batches, recording its steps under `out`."""
    folder = Path(out) / f"{run}-{devices}"
    folder.mkdir(parents=True, exist_ok=True)
    accumulate = ACCUMULATE * 2 // devices
    args = [*BASE, *(UNEVEN if run == "uneven" else RUNS[run]), "--run_dir", str(folder)]
    args += ["--accumulate_grad_batches", str(accumulate), "--devices", str(devices)]
    if devices > 1:
        args += ["--strategy", "ddp"]
    train_module.train(parse(RunConfig, args), extra_callbacks=[RecordSteps(folder)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run under DDP (in a subprocess, launched first) and in one process (here,
    meanwhile)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(out)))
    with open(out / "ddp.log", "w") as log:
        # A session of its own, so that a failure here ends both ranks.
        ddp = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            for run in RUNS:
                train_and_record(str(out), run, devices=1)
            returncode = ddp.wait(timeout=300)
        finally:
            if ddp.poll() is None:
                os.killpg(ddp.pid, signal.SIGKILL)
                ddp.wait()
    assert returncode == 0, (out / "ddp.log").read_text()[-3000:]
    return out


gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


@gloo
@pytest.mark.parametrize("run", list(RUNS))
def test_ddp_equals_doubled_accumulation(runs: Path, run: str):
    single = load_file(runs / f"{run}-1" / "rank0.safetensors")
    rank0 = load_file(runs / f"{run}-2" / "rank0.safetensors")
    rank1 = load_file(runs / f"{run}-2" / "rank1.safetensors")
    assert set(single) == set(rank0) == set(rank1)
    # The ranks hold one model: DDP's gradients, reduced firing counts and minimum.
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # Every step's dead-latent state exactly, with latents that did not fire and dead ones.
    tokens_since_fired = rank0["steps/tokens_since_fired"]
    assert tokens_since_fired.shape[0] == STEPS
    assert torch.equal(tokens_since_fired, single["steps/tokens_since_fired"])
    assert (tokens_since_fired[-1] >= 128).any() and (tokens_since_fired[-1] == 0).any()

    if run == "batchtopk":
        # Every step's threshold: the minimum over the same pools (float64, from float32
        # activations of weights that agree to float32 rounding).
        threshold = rank0["steps/threshold"]
        assert threshold.dtype == torch.float64 and (threshold > 0).all()
        assert threshold.unique().numel() == STEPS
        torch.testing.assert_close(threshold, single["steps/threshold"], rtol=1e-6, atol=0)
    else:
        assert "steps/threshold" not in rank0

    # The weights, to float32 tolerance: the ranks' gradients are summed in another order.
    for name, value in single.items():
        if name.startswith("final/") and value.is_floating_point():
            torch.testing.assert_close(rank0[name], value, msg=name)


@gloo
def test_ddp_schedules_the_steps_it_takes(runs: Path):
    single = load_file(runs / "batchtopk-1" / "rank0.safetensors")
    assert single["schedule/total_steps"].item() == STEPS
    ddp = load_file(runs / "batchtopk-2" / "rank0.safetensors")
    assert ddp["schedule/total_steps"].item() == STEPS


@gloo
def test_a_stream_the_ranks_cannot_share_evenly_ends_at_the_last_whole_round(runs: Path):
    rank0 = load_file(runs / "uneven-2" / "rank0.safetensors")
    rank1 = load_file(runs / "uneven-2" / "rank1.safetensors")
    assert rank0["steps/tokens_since_fired"].shape[0] == STEPS
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
