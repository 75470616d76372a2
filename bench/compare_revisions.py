"""Our training step in two checkouts of the library, paired: is a change free?

One worker process per checkout (`--old DIR` against this one) builds the same MLSAE and
inputs as `bench/train_step.py` (its `SHAPES`, `setup`), then the controller asks them in
turn, alternating which goes first, to time `--steps` steps each; a repeat's ratio is the
new median over the old median, and the report is the median of those ratios per cell.

    git worktree add /tmp/old <revision>
    python bench/compare_revisions.py --old /tmp/old --repeats 9 --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import SHAPES  # noqa: E402

WORKER = """
import json, os, statistics, sys, time
import torch
torch.set_num_threads(int(os.environ["THREADS"]))
from mlsae.model.autoencoder import MLSAE, maintain_decoder
from mlsae.model.losses import auxk_loss, layerwise_fvu
try:
    from mlsae.sparse import make_adam
except ImportError:
    from mlsae.model.optim import make_adam

n_inputs, n_latents, leading, k, auxk = json.loads(os.environ["SHAPE"])
generator = torch.Generator().manual_seed(0)  # as bench/train_step.py's setup
x = torch.randn(*leading, n_inputs, generator=generator) * 3 + 1
encoder = (torch.rand(n_latents, n_inputs, generator=generator) * 2 - 1) / n_inputs**0.5
decoder = (encoder.t() / encoder.t().norm(dim=0, keepdim=True)).contiguous()
bias = torch.randn(n_inputs, generator=generator) * 0.1
dead = torch.zeros(n_latents, dtype=torch.bool)
n_dead = int(float(os.environ["DEAD"]) * n_latents)
dead[torch.randperm(n_latents, generator=generator)[:n_dead]] = True
model = MLSAE(x.shape[-1], encoder.shape[0], k, auxk=auxk, dead_tokens_threshold=1)
with torch.no_grad():
    model.encoder.weight.copy_(encoder)
    model.decoder.weight.copy_(decoder)
    model.pre_encoder_bias.copy_(bias)
    model.tokens_since_fired.copy_(dead.long())
model._dead_indices = None
optimizer = make_adam(model.parameters(), lr=1e-4, eps=6.25e-10)

def step():
    result = model.forward_standardized(x)
    output = result.output
    loss = layerwise_fvu(x, output.recons).mean()
    if output.auxk is not None and output.auxk.values.shape[-1] > 0:
        loss = loss + auxk_loss(result.inputs - result.recons, output.auxk_recons) / 32
    loss.backward()
    maintain_decoder(model.decoder)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

for _ in range(2):
    step()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps(statistics.median(times)), flush=True)
"""


def start_worker(tree: Path, shape: int, dead: float, threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "SHAPE": json.dumps(SHAPES[shape]),
        "DEAD": str(dead),
        "THREADS": str(threads),
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline().strip() == "ready"
    return worker


def timed(worker: subprocess.Popen, steps: int) -> float:
    worker.stdin.write(f"{steps}\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the other checkout")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps per worker per repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--dead", type=float, nargs="*", default=[0.0, 0.01, 0.5])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/compare_revisions.json")
    args = parser.parse_args()
    rows = []
    for shape in args.shape:
        for dead in args.dead:
            workers = {
                name: start_worker(tree, shape, dead, args.threads)
                for name, tree in (("old", args.old.resolve()), ("new", ROOT))
            }
            times: dict[str, list[float]] = {"old": [], "new": []}
            for repeat in range(args.repeats):
                order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
                for name in order:
                    times[name].append(timed(workers[name], args.steps))
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
            ratios = [new / old for new, old in zip(times["new"], times["old"], strict=True)]
            row = {
                "shape": shape,
                "dead": dead,
                "old_ms": 1e3 * statistics.median(times["old"]),
                "new_ms": 1e3 * statistics.median(times["new"]),
                "ratio": statistics.median(ratios),
                "ratios": ratios,
            }
            rows.append(row)
            print(
                f"shape {shape} dead {dead:.0%}: old {row['old_ms']:.0f} ms, "
                f"new {row['new_ms']:.0f} ms, new/old {row['ratio']:.3f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
