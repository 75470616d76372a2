"""A sweep in one run against the same SAEs trained one run at a time.

The transformer is a GPT-NeoX with Pythia-70m's config (`bench.end_to_end.PYTHIA_70M`) and
random weights, saved to a temporary folder with the tiny test model's tokenizer; the text
is the tests' corpus. For each sweep size (3 and 9 SAEs by default: expansion factors x k),
the sweep (`train.py --expansion_factor ... -k ...`) and the separate runs of its SAEs
alternate, in this process, with the same data, steps and threads. Timed: training only
(from the first SAE's `on_train_start` to the last one's `on_train_end`; model loading and
the final validation excluded), and the transformer's forward on the same micro-batches.

Reported: tokens/s per SAE (tokens trained per SAE x SAEs / seconds), the measured speed-up
and its target, (N LM forwards + N SAE steps) / (1 LM forward + N SAE steps), where one SAE
step is a separate run's time less the LM forwards.

    python bench/sweep.py [--threads 2] [--steps 4] [--max_length 256] [--repeats 2]
        [--no_checkpoints]

Every run writes its checkpoints at the end of training (with the transformer's weights),
and a sweep also writes its own step checkpoint of every SAE (docs/sweeps.md). The timed
span ends at the last `on_train_end`, so it holds the sweep's writes of the SAEs that
finished before the last one but not a separate run's final write: compare it with
`--no_checkpoints`, which times the training steps alone, or compare the whole commands
(`whole_command_s`: loading, training, checkpoints, final validation and saving).
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
    """The earliest train start and latest train end of the trainers it is given to."""

    def __init__(self) -> None:
        self.start = self.end = None

    def on_train_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self.start = now if self.start is None else min(self.start, now)

    def on_train_end(self, trainer, pl_module) -> None:
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


def time_lm(model: Path, args: argparse.Namespace, micro_batches: int) -> float:
    """Seconds of the transformer's residual stream for `micro_batches` micro-batches."""
    transformer = Transformer(str(model), max_length=args.max_length, batch_size=args.batch_size)
    tokens = torch.randint(1, 512, (args.batch_size, args.max_length))
    with torch.no_grad():  # as the sweep computes it
        for _ in range(2):  # warm-up
            read_residual_stream(transformer, tokens, **SPECIAL)
        start = time.perf_counter()
        for _ in range(micro_batches):
            read_residual_stream(transformer, tokens, **SPECIAL)
    return time.perf_counter() - start


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


def run_sweep(argv: list[str], skip_checkpoints: bool = False) -> tuple[float, float]:
    """Seconds of the training steps and of the whole command."""
    span = Span()
    start = time.perf_counter()
    with checkpoints_skipped(skip_checkpoints):
        train_sweep(argv, lambda index, name: [span])
    return span.seconds, time.perf_counter() - start


def run_separately(argv: list[str], skip_checkpoints: bool = False) -> tuple[float, float]:
    """Seconds of the training steps and of the whole commands, summed over the runs."""
    steps = whole = 0.0
    for member in sweep_members(argv)[0]:
        span = Span()
        start = time.perf_counter()
        with checkpoints_skipped(skip_checkpoints):
            train(parse(RunConfig, member.args), [span])
        whole += time.perf_counter() - start
        steps += span.seconds
    return steps, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
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
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "pythia-70m-random")
        lm = time_lm(model, args, args.steps)
        for size in args.sizes:
            factors, ks = SIZES[size]
            times: dict[str, list[float]] = {"sweep": [], "separate": []}
            wholes: dict[str, list[float]] = {"sweep": [], "separate": []}
            for repeat in range(args.repeats):
                order = ("sweep", "separate") if repeat % 2 == 0 else ("separate", "sweep")
                for kind in order:
                    run_dir = Path(tmp) / f"runs-{size}-{kind}-{repeat}"
                    argv = base_args(args, model, run_dir) + ["--expansion_factor", *factors]
                    argv += ["-k", *ks]
                    run = run_sweep if kind == "sweep" else run_separately
                    steps, whole = run(argv, args.no_checkpoints)
                    times[kind].append(steps)
                    wholes[kind].append(whole)
                    shutil.rmtree(run_dir, ignore_errors=True)
            sweep, separate = (statistics.median(times[k]) for k in ("sweep", "separate"))
            tokens = args.steps * args.batch_size * args.max_length * size
            whole = {kind: round(statistics.median(v), 3) for kind, v in wholes.items()}
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
                    "samples": times,
                }
            )
    print(json.dumps({"machine": machine_note(), "options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
