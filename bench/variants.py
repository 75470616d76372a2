"""Benchmark one SAE training step of the BatchTopK and Matryoshka MLSAEs against TopK.

The same shapes as `bench/train_step.py` (d_model 512, k 32, AuxK 256; 8,192 latents with
3,072 vectors and 32,768 latents with 1,536 vectors), the same initial weights and inputs
for every architecture, and the step `train.py` takes: `MLSAE.forward_standardized`, the
loss (`mlsae_loss`: Matryoshka sums its prefixes' FVU), backward, the decoder maintenance,
for a BatchTopK selection the threshold's update, and `make_adam`'s step. Architectures:

- "topk": `--architecture topk` (the fused forward and backward).
- "batchtopk": `--architecture batchtopk` (capacity 4 k, one pool over the stack).
- "matryoshka": `--architecture matryoshka` with prefixes of n/16 and n/4 latents and the
  full width (BatchTopK selection, as the default).
- "matryoshka_topk": the same with `--matryoshka_selection topk`.

All run in one process with the same thread count, alternating within every repeat; each
time is the median of `--repeats` after `--warmup` untimed rounds, and each ratio the
median over repeats of the two times of one repeat. Prints a markdown table and writes JSON.

    python bench/variants.py [--threads 2] [--repeats 15] [--dead 0.01]
        [--out bench/results/variants.json]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import interleaved_medians, machine_note, paired_ratio  # noqa: E402
from bench.train_step import AUXK_COEF, EPS, LR, SHAPES, setup  # noqa: E402
from mlsae.model.autoencoder import MLSAE  # noqa: E402
from mlsae.model.losses import mlsae_loss  # noqa: E402
from mlsae.model.maintenance import maintain_decoder  # noqa: E402
from mlsae.model.variants import min_positive  # noqa: E402
from mlsae.sparse import make_adam  # noqa: E402

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "matryoshka_topk")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dead", type=float, default=0.01, help="share of latents dead")
    parser.add_argument("--shape", type=int, nargs="*", help="indices into SHAPES")
    parser.add_argument("--only", nargs="*", choices=ARCHITECTURES, help="default: all")
    parser.add_argument("--out", type=Path, default=Path("bench/results/variants.json"))
    return parser.parse_args()


def options(name: str, n_latents: int) -> dict:
    """`MLSAE`'s architecture options for one benchmarked architecture."""
    if name.startswith("matryoshka"):
        widths = [n_latents // 16, n_latents // 4]
        selection = "topk" if name == "matryoshka_topk" else "batchtopk"
        return {
            "architecture": "matryoshka",
            "matryoshka_widths": widths,
            "matryoshka_selection": selection,
        }
    return {"architecture": name}


def make_model(name: str, encoder, decoder, bias, dead, k, auxk) -> MLSAE:
    n_latents, n_inputs = encoder.shape
    model = MLSAE(
        n_inputs, n_latents, k, auxk=auxk, dead_tokens_threshold=1, **options(name, n_latents)
    )
    with torch.no_grad():
        model.encoder.weight.copy_(encoder)
        model.decoder.weight.copy_(decoder)
        model.pre_encoder_bias.copy_(bias)
        model.tokens_since_fired.copy_(dead.long())
    model._dead_indices = None
    return model.train()


def step(model: MLSAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One optimizer step of one micro-batch, as `MLSAETransformer` takes it."""
    result = model.forward_standardized(x)
    loss = mlsae_loss(x, result, None, AUXK_COEF)
    minimum = min_positive(result.output.topk.values) if model.variant.batchtopk else None
    loss.total.backward()
    maintain_decoder(model.decoder)
    if minimum is not None:
        model.update_batchtopk_threshold(minimum)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in ARCHITECTURES if not args.only or n in args.only]
    if "topk" not in names:
        names.insert(0, "topk")
    shape_indices = args.shape if args.shape is not None else range(len(SHAPES))

    rows = []
    for shape_index in shape_indices:
        x, encoder, decoder, bias, dead, k, auxk = setup(shape_index, args.dead, args.seed)
        functions, keep = {}, []
        for name in names:
            model = make_model(name, encoder, decoder, bias, dead, k, auxk)
            optimizer = make_adam(model.parameters(), lr=LR, eps=EPS)
            keep.append((model, optimizer))
            functions[name] = lambda m=model, o=optimizer, x=x: step(m, o, x)
        timings = interleaved_medians(functions, args.repeats, args.warmup)
        n_latents = encoder.shape[0]
        row = {
            "n_latents": n_latents,
            "n_vectors": x.numel() // x.shape[-1],
            "k": k,
            "auxk": auxk,
            "dead_fraction": args.dead,
            "options": {name: options(name, n_latents) for name in names},
            "timings": timings,
            "ratio_over_topk": {name: paired_ratio(timings, name, "topk") for name in names},
        }
        rows.append(row)
        cells = ", ".join(
            f"{name} {t['median_s'] * 1e3:.0f} ms ({row['ratio_over_topk'][name]:.2f}x)"
            for name, t in timings.items()
        )
        print(f"# {n_latents} latents, dead {args.dead:.0%}: {cells}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_note(), "repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2))
    print("\n| latents | dead | architecture | median ms | min-max ms | x topk |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for name, t in row["timings"].items():
            print(
                f"| {row['n_latents']:,} | {row['dead_fraction']:.0%} | {name}"
                f" | {t['median_s'] * 1e3:.0f} | {t['min_s'] * 1e3:.0f}-{t['max_s'] * 1e3:.0f}"
                f" | {row['ratio_over_topk'][name]:.2f} |"
            )
    print(f"\nthreads: {torch.get_num_threads()}; wrote {args.out}")


if __name__ == "__main__":
    main()
