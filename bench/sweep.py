"""A sweep in one run against the same SAEs trained one run at a time.

The transformer is a GPT-NeoX with Pythia-70m's config (`bench.end_to_end.PYTHIA_70M`) and
random weights, saved to a temporary folder with the tiny test model's tokenizer; the text
is the tests' corpus. For each sweep size (3 and 9 SAEs by default: expansion factors x k),
the sweep (`train.py --expansion_factor ... -k ...`) and the separate runs of its SAEs
alternate, in this process, with the same data, steps and threads.

Timed: the training steps after each SAE's first `--warmup_steps` (whose time goes to the
first touch of the SAE's memory), from the earliest start of the first timed micro-batch to
the latest end of a micro-batch, so model loading, the final validation and the checkpoint
writes after the last step are left out; and the transformer's forward on as many
micro-batches. Also timed: the whole commands (`whole_command_s`: loading, training,
checkpoints, the final validation and saving). `--no_checkpoints` makes every checkpoint
write a no-op (a sweep writes a checkpoint of every SAE at its last step inside the span).

Reported: tokens/s per SAE (tokens trained per SAE x SAEs / seconds), the measured speed-up
and its target, (N LM forwards + N SAE steps) / (1 LM forward + N SAE steps), where one SAE
step is a separate run's time less the LM forwards. The same from the median time of one
micro-batch (`median_batch_*`: a sweep's round of every SAE's step against the sum of the
separate runs' medians), which a pause of a shared machine does not move, and the sweep's
median batch over the ideal one (one LM forward + the SAE steps).

    python bench/sweep.py [--threads 2] [--steps 12] [--warmup_steps 4] [--max_length 256]
        [--repeats 2] [--sizes 3 9] [--no_checkpoints]
"""

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from bench.common import machine_note  # noqa: E402
from bench.end_to_end import PYTHIA_70M  # noqa: E402
from mlsae.cli import parse  # noqa: E402
from mlsae.lm.stream import read_residual_stream  # noqa: E402
from mlsae.lm.transformer import Transformer  # noqa: E402
from mlsae.trainer.config import RunConfig  # noqa: E402
from mlsae.trainer.sweep import train_sweep  # noqa: E402
from mlsae.trainer.sweep_options import sweep_members  # noqa: E402
from mlsae.trainer.train import train  # noqa: E402

GOLDENS = Path(__file__).resolve().parents[1] / "tests" / "data" / "goldens"
SPECIAL = {"skip_special_tokens": True, "count_special_tokens": False}
SIZES = {3: (["4", "8", "16"], ["32"]), 9: (["4", "8", "16"], ["16", "32", "64"])}


class Span(Callback):
    """From the earliest start of micro-batch `warmup` to the latest end of a micro-batch,
    over the trainers it is given to."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = None
        self.starts: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            self.starts.setdefault(id(trainer), []).append(now)
        if batch_idx == self.warmup:
            self.start = now if self.start is None else min(self.start, now)

    @property
    def batch_seconds(self) -> float:
        """The median time from one micro-batch's start to the next's, of the trainer that
        starts first (in a sweep, a round of every SAE's step on that micro-batch): robust
        to the pauses of a shared machine, which the span's total is not."""
        lead = min(self.starts.values(), key=lambda starts: starts[0])
        return statistics.median(b - a for a, b in zip(lead[:-1], lead[1:], strict=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def make_model(folder: Path) -> Path:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDENS / "tiny-gpt-neox-2" / name, folder / name)
    return folder


def base_args(args: argparse.Namespace, model: Path, run_dir: Path) -> list[str]:
    tokens = args.steps * args.batch_size * args.max_length
    return ["--model_name", str(model), "--path", str(GOLDENS / "corpus.jsonl.zst"),
            "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
            "--accumulate_grad_batches", "1", "--max_tokens", str(tokens),
            "--val_tokens", str(args.max_length), "--limit_val_batches", "0",
            "--val_check_interval", "100000", "--checkpoint_every_n_steps", "100000",
            "--logger", "none", "--run", "bench", "--run_dir", str(run_dir)]  # fmt: skip


def time_lm(model: Path, args: argparse.Namespace, micro_batches: int) -> tuple[float, float]:
    """Seconds of the transformer's residual stream for `micro_batches` micro-batches, and
    the median of one."""
    transformer = Transformer(str(model), max_length=args.max_length, batch_size=args.batch_size)
    tokens = torch.randint(1, 512, (args.batch_size, args.max_length))
    times = []
    with torch.no_grad():  # as the sweep computes it
        for _ in range(2):  # warm-up
            read_residual_stream(transformer, tokens, **SPECIAL)
        for _ in range(micro_batches):
            start = time.perf_counter()
            read_residual_stream(transformer, tokens, **SPECIAL)
            times.append(time.perf_counter() - start)
    return sum(times), statistics.median(times)


@contextlib.contextmanager
def checkpoints_skipped(skip: bool) -> Iterator[None]:
    """With `skip`, `Trainer.save_checkpoint` writes nothing (`--no_checkpoints`)."""
    if not skip:
        yield
        return
    original = Trainer.save_checkpoint
    Trainer.save_checkpoint = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Trainer.save_checkpoint = original


def run_sweep(
    argv: list[str], warmup: int, skip_checkpoints: bool = False
) -> tuple[float, float, float]:
    """Seconds of the training steps after `warmup`, of the whole command, and the median
    of a micro-batch (every SAE's step on it)."""
    span = Span(warmup)
    start = time.perf_counter()
    with checkpoints_skipped(skip_checkpoints):
        train_sweep(argv, lambda index, name: [span])
    return span.seconds, time.perf_counter() - start, span.batch_seconds


def run_separately(
    argv: list[str], warmup: int, skip_checkpoints: bool = False
) -> tuple[float, float]:
    """Seconds of the training steps after `warmup`, of the whole commands, and the median
    of a micro-batch, each summed over the runs."""
    steps = whole = batch = 0.0
    for member in sweep_members(argv)[0]:
        span = Span(warmup)
        start = time.perf_counter()
        with checkpoints_skipped(skip_checkpoints):
            train(parse(RunConfig, member.args), [span])
        whole += time.perf_counter() - start
        steps += span.seconds
        batch += span.batch_seconds
    return steps, whole, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--warmup_steps",
        type=int,
        default=4,
        help="steps of each SAE left out of the timed span (the first touch of its memory)",
    )
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 9])
    parser.add_argument(
        "--no_checkpoints",
        action="store_true",
        help="time the training steps without the checkpoint writes at the end of training",
    )
    args = parser.parse_args()
    if not 0 <= args.warmup_steps <= args.steps - 2:
        parser.error("--warmup_steps must be at least 0 and leave 2 or more of --steps timed")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "pythia-70m-random")
        timed_steps = args.steps - args.warmup_steps
        lm, lm_batch = time_lm(model, args, timed_steps)
        for size in args.sizes:
            factors, ks = SIZES[size]
            times: dict[str, list[float]] = {"sweep": [], "separate": []}
            wholes: dict[str, list[float]] = {"sweep": [], "separate": []}
            batches: dict[str, list[float]] = {"sweep": [], "separate": []}
            for repeat in range(args.repeats):
                order = ("sweep", "separate") if repeat % 2 == 0 else ("separate", "sweep")
                for kind in order:
                    run_dir = Path(tmp) / f"runs-{size}-{kind}-{repeat}"
                    argv = base_args(args, model, run_dir) + ["--expansion_factor", *factors]
                    argv += ["-k", *ks]
                    run = run_sweep if kind == "sweep" else run_separately
                    steps, whole, batch = run(argv, args.warmup_steps, args.no_checkpoints)
                    times[kind].append(steps)
                    wholes[kind].append(whole)
                    batches[kind].append(batch)
                    shutil.rmtree(run_dir, ignore_errors=True)
            sweep, separate = (statistics.median(times[k]) for k in ("sweep", "separate"))
            tokens = timed_steps * args.batch_size * args.max_length * size
            whole = {kind: round(statistics.median(v), 3) for kind, v in wholes.items()}
            batch = {kind: statistics.median(v) for kind, v in batches.items()}
            # One LM forward and every SAE's step: a separate run's batch less the others'.
            ideal_batch = batch["separate"] - (size - 1) * lm_batch
            rows.append(
                {
                    "saes": size,
                    "sweep_s": round(sweep, 3),
                    "separate_s": round(separate, 3),
                    "lm_forward_s_per_run": round(lm, 3),
                    "tokens_per_s_per_sae_sweep": round(tokens / sweep),
                    "tokens_per_s_per_sae_separate": round(tokens / separate),
                    "speedup": round(separate / sweep, 2),
                    "whole_command_s": whole,
                    "whole_command_speedup": round(whole["separate"] / whole["sweep"], 2),
                    "target_speedup": round(separate / (separate - (size - 1) * lm), 2),
                    "median_batch_s": {kind: round(v, 4) for kind, v in batch.items()},
                    "lm_forward_median_batch_s": round(lm_batch, 4),
                    "median_batch_speedup": round(batch["separate"] / batch["sweep"], 2),
                    "median_batch_target_speedup": round(batch["separate"] / ideal_batch, 2),
                    "median_batch_sweep_over_ideal": round(batch["sweep"] / ideal_batch, 3),
                    "samples": times,
                    "median_batch_samples": batches,
                }
            )
    print(json.dumps({"machine": machine_note(), "options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
