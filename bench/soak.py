"""Soak test: train the quick-start MLSAE for many steps and watch the memory.

Records the resident set size every `--every` optimizer steps through the real
training path (Lightning, metrics, CSV logging, validation and checkpoints), and
prints the growth between the first and the last record. Run from the repository
root:  python bench/soak.py --steps 10000 --every 500
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

from mlsae.trainer.config import RunConfig, parse
from mlsae.trainer.train import train


def rss_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MiB (Linux)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class MemoryRecorder(Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.records: list[dict[str, float]] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.records or self.records[-1]["step"] != step):
            current, peak = rss_mib()
            elapsed = time.perf_counter() - self.start
            self.records.append({"step": step, "rss_mib": current, "peak_mib": peak, "s": elapsed})
            print(f"step {step:>6}  rss {current:8.1f} MiB  peak {peak:8.1f} MiB  {elapsed:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()

    run_dir = tempfile.mkdtemp(prefix="mlsae-soak-")
    config = parse(
        RunConfig,
        [
            "--model_name", "quickstart/model", "--path", "quickstart/data",
            "--val_path", "quickstart/data", "--max_length", "32", "--batch_size", "1",
            "--accumulate_grad_batches", "1", "--max_tokens", str(args.steps * 32),
            "--expansion_factor", "16", "-k", "16", "--auxk", "64", "--lr", "1e-3",
            "--dead_tokens_threshold", "20000", "--val_check_interval", "1000",
            "--limit_val_batches", "4", "--checkpoint_every_n_steps", "2000",
            "--log_every_n_steps", "50", "--logger", "csv", "--run_dir", run_dir,
            "--run", "soak",
        ],
    )  # fmt: skip
    recorder = MemoryRecorder(args.every)
    train(config, extra_callbacks=[recorder])
    records = recorder.records
    growth = records[-1]["rss_mib"] - records[1]["rss_mib"] if len(records) > 2 else 0.0
    result = {
        "steps": records[-1]["step"] if records else 0,
        "records": records,
        "rss_growth_after_first_interval_mib": growth,
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(f"RSS growth from step {records[1]['step']} to {records[-1]['step']}: {growth:.1f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
