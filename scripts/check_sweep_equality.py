"""Train a sweep of 9 SAEs on the quick-start model in one run, then each SAE in a run of
its own, and compare what they saved: the model files byte for byte, and the last
checkpoint's weights and optimizer state tensor for tensor.

    python scripts/check_sweep_equality.py [--steps 8] [--out out/sweep-check]

Prints one line per SAE and exits with status 1 if any differs.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlsae.cli import parse  # noqa: E402
from mlsae.trainer.config import RunConfig  # noqa: E402
from mlsae.trainer.sweep import train_sweep  # noqa: E402
from mlsae.trainer.sweep_options import sweep_members  # noqa: E402
from mlsae.trainer.train import train  # noqa: E402


def sweep_args(steps: int, run_dir: Path) -> list[str]:
    return ["--model_name", "quickstart/model", "--path", "quickstart/data",
            "--val_path", "quickstart/data", "--max_length", "128", "--batch_size", "8",
            "--accumulate_grad_batches", "1", "--max_tokens", str(steps * 1024),
            "--expansion_factor", "8", "16", "32", "-k", "8", "16", "32", "--auxk", "64",
            "--lr", "1e-3", "--dead_tokens_threshold", "100000", "--limit_val_batches", "2",
            "--logger", "none", "--run", "sweep", "--run_dir", str(run_dir)]  # fmt: skip


def same_checkpoint(a: Path, b: Path) -> bool:
    first = torch.load(a, map_location="cpu", weights_only=True)
    second = torch.load(b, map_location="cpu", weights_only=True)
    states = (first["state_dict"], second["state_dict"])
    if states[0].keys() != states[1].keys():
        return False
    if not all(torch.equal(states[0][key], states[1][key]) for key in states[0]):
        return False
    optimizers = (first["optimizer_states"], second["optimizer_states"])
    flat = [[t for state in o for t in tensors(state)] for o in optimizers]
    return len(flat[0]) == len(flat[1]) and all(map(torch.equal, *flat))


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors(value[key])
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out/sweep-check"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    swept, alone = args.out / "sweep", args.out / "alone"
    train_sweep(sweep_args(args.steps, swept))
    members = sweep_members(sweep_args(args.steps, alone))[0]
    different = 0
    for member in members:
        train(parse(RunConfig, member.args))
        files = [root / member.name for root in (swept, alone)]
        model_same = all(
            (files[0] / "model" / name).read_bytes() == (files[1] / "model" / name).read_bytes()
            for name in ("model.safetensors", "config.json")
        )
        checkpoints = [f / "checkpoints" / "last.ckpt" for f in files]
        checkpoint_same = same_checkpoint(*checkpoints)
        different += not (model_same and checkpoint_same)
        print(f"{member.name}: model files equal {model_same}, checkpoint equal {checkpoint_same}")
    print(f"{len(members) - different} of {len(members)} SAEs equal to their own runs")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
