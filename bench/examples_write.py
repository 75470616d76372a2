"""Benchmark what `python -m mlsae.analysis.examples` does after its last batch: turning the
kept examples into rows (`TopExamples.examples`) and writing them to SQLite (`write_db`:
JSON-encoding the windows, inserting, indexing, committing, moving into place).

The kept examples are synthetic: every slot of `--layers` x `--latents` x `--examples`
filled, windows of `2 * --tokens + 1` positions, token ids below 512 (the tokenizer is the
tests' tiny GPT-NeoX). Pythia-70m x64 has 6 x 32,768 latents, 32 examples and 4 tokens
either side: 6.3M rows, about 2 GB of SQLite; the default is an eighth of that.

    python bench/examples_write.py [--latents 4096] [--out bench/results/examples_write.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine_note  # noqa: E402
from mlsae.analysis.examples import TopExamples  # noqa: E402
from mlsae.analysis.examples_db import write_db  # noqa: E402

TOKENIZER = ROOT / "tests" / "data" / "goldens" / "tiny-gpt-neox-2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    return parser.parse_args()


def full_top_examples(args: argparse.Namespace) -> TopExamples:
    """Every slot filled with a value, a token and a window (the first window clipped)."""
    top = TopExamples(args.layers, args.latents, args.examples, args.tokens)
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(top.values.shape, generator=generator)
    top.values = values.sort(dim=1, descending=True).values.half().float()
    top.token_ids = torch.randint(0, 512, top.token_ids.shape, generator=generator).int()
    windows = torch.randint(0, 512, top.window_token_ids.shape, generator=generator).int()
    windows[:, 0, : args.tokens] = -1  # As at the start of a sequence.
    top.window_token_ids = windows
    top.window_acts = torch.rand(top.window_acts.shape, generator=generator).half()
    return top


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    top = full_top_examples(args)
    n_rows = len(top)

    start = time.perf_counter()
    for _ in top.examples(tokenizer):
        pass
    rows_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench-examples.db"
        start = time.perf_counter()
        write_db(top.examples(tokenizer), path, args.layers, args.latents)
        write_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20

    figures = {
        "rows": n_rows,
        "rows_s": rows_s,
        "rows_and_write_s": write_s,
        "rows_per_s": n_rows / write_s,
        "db_mib": size_mb,
        "shape": vars(args) | {"out": None},
        "machine": machine_note(),
    }
    print(f"{n_rows:,} rows ({args.layers} layers x {args.latents:,} latents x {args.examples})")
    print(f"| step | seconds |\n| --- | ---: |\n| rows (`TopExamples.examples`) | {rows_s:.1f} |")
    print(f"| rows + `write_db` | {write_s:.1f} |")
    print(f"{n_rows / write_s:,.0f} rows/s end to end; database {size_mb:,.0f} MiB")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
