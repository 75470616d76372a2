"""Benchmark the sparse decode backends against the dense reference, forward + backward.

Shapes of the Pythia-70m MLSAEs (d_model 512): 8,192 latents with 3,072 vectors and
32,768 latents with 1,536 vectors, k = 32 (and k = 256, an AuxK-like decode). Each row is
the median of `--repeats` timed forward + backward passes after a warm-up, the backends
alternating within every repeat. Prints a markdown table and writes JSON.

    python bench/decode.py [--device cuda] [--out bench/results/decode.json]

"native" is the `embedding_bag` kernel with the C backward, "sparse" the same with the
torch backward; "embedding_bag_autograd" (plain `F.embedding_bag`, torch's own backward)
is a baseline for those backwards, not a backend. Triton runs on CUDA; on
a CPU only with `--triton-interpret` (Triton's interpreter: minutes per pass at these
shapes). `--sweep` adds a k sweep at 4,096 latents for the dense crossover.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [
    # n_inputs, n_latents, n_vectors, k
    (512, 8192, 3072, 32),
    (512, 32768, 1536, 32),
    (512, 8192, 3072, 256),
    (512, 32768, 1536, 256),
]
SWEEP = [(512, 4096, 2048, k) for k in (64, 256, 512, 1024, 2048)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    parser.add_argument("--triton-interpret", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlsae.sparse.decoder import decode
    from mlsae.types import TopK

    backends = ["dense", "native", "sparse", "embedding_bag_autograd"]
    if device.type == "cuda" or args.triton_interpret:
        backends.append("triton")

    def run(backend, values, indices, weight, grad):
        if backend == "embedding_bag_autograd":
            out = F.embedding_bag(indices, weight.t(), per_sample_weights=values, mode="sum")
        else:
            out = decode(TopK(values, indices), weight, backend)
        out.backward(grad)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    shapes = SHAPES + (SWEEP if args.sweep else [])
    rows = []
    for n_inputs, n_latents, n_vectors, k in shapes:
        weight = torch.randn(n_inputs, n_latents, generator=generator)
        weight = (weight / weight.norm(dim=0)).t().contiguous().t()  # latent-major, as MLSAE's
        weight = weight.to(device, dtype).requires_grad_()
        scores = torch.rand(n_vectors, n_latents, generator=generator)
        indices = scores.topk(k, dim=-1).indices.to(device)
        del scores
        values = torch.rand(n_vectors, k, generator=generator).to(device, dtype)
        values.requires_grad_()
        grad = torch.randn(n_vectors, n_inputs, generator=generator).to(device, dtype)
        shape_backends = list(backends)
        times = {backend: [] for backend in shape_backends}
        for repeat in range(args.warmup + args.repeats):
            shift = repeat % len(shape_backends)
            for backend in shape_backends[shift:] + shape_backends[:shift]:
                weight.grad = values.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run(backend, values, indices, weight, grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat >= args.warmup:
                    times[backend].append((time.perf_counter() - start) * 1e3)
        dense_ms = statistics.median(times["dense"])
        for backend, ts in times.items():
            median = statistics.median(ts)
            rows.append(
                dict(
                    n_inputs=n_inputs,
                    n_latents=n_latents,
                    n_vectors=n_vectors,
                    k=k,
                    backend=backend,
                    median_ms=median,
                    times_ms=ts,
                    time_vs_dense=median / dense_ms,
                )
            )
            print(
                f"{n_latents:>6} {n_vectors:>5} {k:>4} {backend:<24} {median:9.2f} ms", flush=True
            )

    threads = torch.get_num_threads()
    print()
    print(
        f"forward + backward, {args.dtype}, device {device}, torch {torch.__version__}, "
        f"{threads} threads, median of {args.repeats}"
    )
    print()
    print("| latents | vectors | k | backend | ms | time / dense |")
    print("|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['n_latents']} | {r['n_vectors']} | {r['k']} | {r['backend']} "
            f"| {r['median_ms']:.2f} | {r['time_vs_dense']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        dtype=args.dtype,
        torch=torch.__version__,
        threads=threads,
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        repeats=args.repeats,
        warmup=args.warmup,
        triton_interpret=args.triton_interpret,
    )
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
