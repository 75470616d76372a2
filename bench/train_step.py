"""Benchmark one SAE training step (AuxK on) against dense references and the floor.

Shapes of the Pythia-70m MLSAEs (d_model 512, k 32, AuxK 256): 8,192 latents with 3,072
vectors (6 layers x 2 x 256) and 32,768 latents with 1,536 vectors, each with no dead
latents, with 1% of them dead (a steady state: AuxK's top-k over few columns, its decode
at full size) and with half of them dead. Implementations:

- "mlsae": `MLSAE.forward_standardized`, the layerwise FVU and AuxK losses, backward, the
  decoder maintenance of `MLSAETransformer.on_before_optimizer_step`, `make_adam`.
- "dense": a dense autograd TopK SAE (`bench/reference.py`), fused Adam.
- "original": the original mlsae's step (`torch.sparse.mm` decode, foreach Adam).
- "sparsify": EleutherAI sparsify's `SparseCoder` with its AuxK, `torch.optim.Adam`, when
  `eai-sparsify` is installed (Triton disabled on the CPU).
- "floor": the encoder matmul plus one fused Adam step over the same parameters;
  "floor_prealloc" the same with the matmul writing into a preallocated output (no page
  faults), and "matmul" the matmul alone.
- "decode": our public `decode` forward + backward alone, once for the top-k and once for
  AuxK's selection when latents are dead.
- "step_decode": the decode as our step runs it (`fused.decode_selections`, then the
  fused backward's values' and decoder's gradients, without the encoder's): both
  selections in one sparse pass, AuxK's as dense products where few latents are dead.

All run in one process with the same thread count, alternating within every repeat; each
time is the median of `--repeats` after `--warmup` untimed rounds, and each ratio the
median over repeats of the two times of one repeat (the floors run right after our step).
Peak memory of the mlsae step is measured in a fresh process (see `bench/common.py`).
Prints a markdown table and writes JSON.

    python bench/train_step.py [--threads 2] [--repeats 5] [--out bench/results/train_step.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    current_rss_bytes,
    interleaved_medians,
    machine_note,
    paired_ratio,
    peak_rss_bytes,
    reset_peak_rss,
    run_isolated,
)
from bench.reference import OriginalStyleSAE, reference_step  # noqa: E402
from bench.sparsify_step import make_sparsify, sparsify_step  # noqa: E402
from mlsae.model.autoencoder import MLSAE  # noqa: E402
from mlsae.model.losses import mlsae_loss as library_loss  # noqa: E402
from mlsae.model.maintenance import maintain_decoder  # noqa: E402
from mlsae.model.reference import ReferenceSAE  # noqa: E402
from mlsae.sparse import fused, fused_backward, make_adam  # noqa: E402
from mlsae.sparse.decoder import decode  # noqa: E402
from mlsae.sparse.encoder import select_latents  # noqa: E402
from mlsae.types import TopK  # noqa: E402

SHAPES = [
    # n_inputs, n_latents, (layers, batch, pos), k, auxk
    (512, 8192, (6, 2, 256), 32, 256),
    (512, 32768, (6, 1, 256), 32, 256),
]
DEAD_FRACTIONS = (0.0, 0.01, 0.5)
AUXK_COEF = 1 / 32
LR, EPS = 1e-4, 6.25e-10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    parser.add_argument("--only", nargs="*", help="implementations to run (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--shape", type=int, nargs="*", help="indices into SHAPES")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("SHAPE", "DEAD"), help=argparse.SUPPRESS
    )
    return parser.parse_args()


def setup(shape_index: int, dead_fraction: float, seed: int):
    """Inputs, the shared initial parameters and the dead mask of one benchmark cell."""
    n_inputs, n_latents, leading, k, auxk = SHAPES[shape_index]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, n_inputs, generator=generator) * 3 + 1
    encoder = (torch.rand(n_latents, n_inputs, generator=generator) * 2 - 1) / n_inputs**0.5
    decoder = encoder.t() / encoder.t().norm(dim=0, keepdim=True)
    bias = torch.randn(n_inputs, generator=generator) * 0.1
    dead = torch.zeros(n_latents, dtype=torch.bool)
    n_dead = int(dead_fraction * n_latents)
    dead[torch.randperm(n_latents, generator=generator)[:n_dead]] = True
    return x, encoder, decoder.contiguous(), bias, dead, k, auxk


def make_mlsae(encoder, decoder, bias, dead, k, auxk) -> MLSAE:
    n_latents, n_inputs = encoder.shape
    model = MLSAE(n_inputs, n_latents, k, auxk=auxk, dead_tokens_threshold=1)
    with torch.no_grad():
        model.encoder.weight.copy_(encoder)
        model.decoder.weight.copy_(decoder)
        model.pre_encoder_bias.copy_(bias)
        model.tokens_since_fired.copy_(dead.long())
    model._dead_indices = None
    return model


def mlsae_loss(model: MLSAE, x: torch.Tensor) -> torch.Tensor:
    return library_loss(x, model.forward_standardized(x), None, AUXK_COEF).total


def mlsae_step(model: MLSAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = mlsae_loss(model, x)
    loss.backward()
    maintain_decoder(model.decoder)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_parity(x, encoder, decoder, bias, dead, k, auxk) -> dict[str, float]:
    """Gradients of one mlsae loss against the dense autograd reference's, in float64 (fp32
    pre-activations can tie exactly at the k-th value, and a tie may go either way). The
    sparse decode accumulates in fp32 whatever the input dtype, hence the tolerance."""
    x, encoder, decoder, bias = (t.double() for t in (x, encoder, decoder, bias))
    model = make_mlsae(encoder, decoder, bias, dead, k, auxk).double()
    reference = ReferenceSAE(encoder, decoder, bias, k, auxk)
    loss = mlsae_loss(model, x)
    loss.backward()
    loss_ref = reference.loss(x, dead, AUXK_COEF)
    loss_ref.backward()
    pairs = {
        "encoder": (model.encoder.weight.grad, reference.encoder.grad),
        "decoder": (model.decoder.weight.grad, reference.decoder.grad),
        "pre_encoder_bias": (model.pre_encoder_bias.grad, reference.pre_encoder_bias.grad),
    }
    result = {"loss_abs_diff": abs(loss.item() - loss_ref.item())}
    for name, (ours, ref) in pairs.items():
        scale = ref.abs().max().item() or 1.0
        result[f"{name}_grad_max_rel_diff"] = (ours - ref).abs().max().item() / scale
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    return result


def make_floor(encoder, decoder, bias, flat: torch.Tensor):
    """The encoder matmul and a fused Adam step over parameters of the same sizes; and the
    same into a preallocated output, which spares the page faults of a fresh allocation
    (glibc maps every block of 32 MiB or more afresh)."""
    params = [torch.nn.Parameter(t.clone()) for t in (encoder, decoder, bias)]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    optimizer = torch.optim.Adam(params, lr=LR, eps=EPS, fused=True)
    weight = encoder.clone()
    out = torch.empty(flat.shape[0], weight.shape[0])

    def matmul() -> None:
        flat @ weight.t()

    def floor() -> None:
        flat @ weight.t()
        optimizer.step()

    def floor_preallocated() -> None:
        torch.mm(flat, weight.t(), out=out)
        optimizer.step()

    return floor, floor_preallocated, matmul, optimizer


def make_decode(encoder, decoder, flat, dead, k, auxk):
    """Our decode forward + backward at the step's shapes: top-k, and AuxK's over dead."""
    n_vectors = flat.shape[0]
    pre = flat @ encoder.t()
    values, indices = pre.topk(k, dim=-1)
    selections = [(values.relu(), indices)]
    n_dead = int(dead.sum())
    if auxk and n_dead:
        dead_indices = dead.nonzero().squeeze(-1)
        aux_values, positions = pre[:, dead_indices].topk(min(auxk, n_dead), dim=-1)
        selections.append((aux_values.relu(), dead_indices[positions]))
    del pre
    weight = decoder.t().contiguous().t().requires_grad_()  # latent-major, as MLSAE stores it
    leaves = [v.clone().requires_grad_() for v, _ in selections]
    grad = torch.randn(n_vectors, decoder.shape[0])

    def run() -> None:
        for leaf, (_, idx) in zip(leaves, selections, strict=True):
            decode(TopK(leaf, idx), weight).backward(grad)
        weight.grad = None
        for leaf in leaves:
            leaf.grad = None

    return run


def make_step_decode(encoder, decoder, flat, dead, k, auxk):
    """The decode forward + backward as `fused_autoencode` runs it inside our step, on the
    step's selections: the forward of `fused.decode_selections`, then the sparse pass for
    the values' and the decoder's gradients (no encoder gradient: that is the encoder's
    backward), plus the dense AuxK products where the forward took them."""
    dead_indices = dead.nonzero().squeeze(-1)
    values, indices, auxk_values, auxk_indices = select_latents(
        flat, encoder, k, auxk, dead_indices if dead_indices.numel() else None, True
    )
    topk = TopK(values.relu(), indices)
    aux = TopK(auxk_values.relu(), auxk_indices)
    table = decoder.t().contiguous()  # latent-major, as MLSAE stores it
    grad, grad_aux = torch.randn_like(flat), torch.randn_like(flat)
    needs = fused_backward.Needs(inputs=False, bias=False, encoder=False, decoder=True)

    def run() -> None:
        _, _, dense_auxk = fused.decode_selections(table, topk, aux, dead_indices)
        selection = fused_backward.Selection(flat, encoder, table, *topk, *aux)
        fused_backward.selection_gradients(
            needs, selection, dense_auxk, True, None, None, grad, grad_aux
        )

    return run


def memory_child(shape_index: int, dead_fraction: float, seed: int) -> None:
    x, encoder, decoder, bias, dead, k, auxk = setup(shape_index, dead_fraction, seed)
    model = make_mlsae(encoder, decoder, bias, dead, k, auxk)
    optimizer = make_adam(model.parameters(), lr=LR, eps=EPS)
    mlsae_step(model, optimizer, x)  # creates the optimizer state
    del encoder, decoder, bias
    before = current_rss_bytes()
    reset_peak_rss()
    mlsae_step(model, optimizer, x)
    peak_extra = peak_rss_bytes() - before
    n_params = sum(p.numel() for p in model.parameters())
    n_vectors = x.numel() // x.shape[-1]
    persistent = 4 * (3 * n_params) + x.numel() * 4  # params + Adam's two moments + inputs
    allowance = 4 * (n_vectors * model.n_latents + 4 * n_params) + x.numel() * 4
    print(
        json.dumps(
            {
                "step_extra_bytes": peak_extra,
                "persistent_bytes": persistent,
                "peak_bytes": persistent + peak_extra,
                "allowance_bytes": allowance,
                "pre_activation_bytes": 4 * n_vectors * model.n_latents,
            }
        )
    )


def build_functions(names, x, encoder, decoder, bias, dead, k, auxk):
    """The timed step of every implementation in `names`, and objects to keep alive."""
    flat = x.reshape(-1, x.shape[-1])
    functions = {}
    keep = []  # hold the modules and optimizers alive
    if "mlsae" in names:
        model = make_mlsae(encoder, decoder, bias, dead, k, auxk)
        opt = make_adam(model.parameters(), lr=LR, eps=EPS)
        functions["mlsae"] = lambda m=model, o=opt: mlsae_step(m, o, x)
    # The floors run next to our step, so that the paired ratios compare adjacent runs.
    floor, floor_preallocated, matmul, opt = make_floor(encoder, decoder, bias, flat)
    keep.append(opt)
    functions["floor"], functions["floor_prealloc"] = floor, floor_preallocated
    functions["matmul"] = matmul
    for name, fused_adam, kind in (
        ("dense", True, ReferenceSAE),
        ("original", False, OriginalStyleSAE),
    ):
        if name in names:
            sae = kind(encoder, decoder, bias, k, auxk)
            opt = torch.optim.Adam(sae.parameters(), lr=LR, eps=EPS, fused=fused_adam)
            functions[name] = lambda s=sae, o=opt: reference_step(s, o, x, dead, AUXK_COEF)
    if "sparsify" in names:
        coder, opt = make_sparsify(encoder, decoder, bias, k, LR, EPS)
        functions["sparsify"] = lambda c=coder, o=opt: sparsify_step(c, o, flat, dead, AUXK_COEF)
    if "decode" in names:
        functions["decode"] = make_decode(encoder, decoder, flat, dead, k, auxk)
    if "step_decode" in names:
        functions["step_decode"] = make_step_decode(encoder, decoder, flat, dead, k, auxk)
    return functions, keep


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), float(args.memory_child[1]), args.seed)
        return
    try:
        import sparsify  # noqa: F401

        have_sparsify = True
    except ImportError:
        have_sparsify = False

    names = ["mlsae", "dense", "original", "sparsify", "floor", "matmul", "decode", "step_decode"]
    if not have_sparsify:
        names.remove("sparsify")
    if args.only:
        names = [n for n in names if n in args.only]
    shape_indices = args.shape if args.shape is not None else range(len(SHAPES))

    rows = []
    for shape_index in shape_indices:
        for dead_fraction in DEAD_FRACTIONS:
            x, encoder, decoder, bias, dead, k, auxk = setup(shape_index, dead_fraction, args.seed)
            flat = x.reshape(-1, x.shape[-1])
            parity = check_parity(x, encoder, decoder, bias, dead, k, auxk)
            functions, keep = build_functions(names, x, encoder, decoder, bias, dead, k, auxk)
            timings = interleaved_medians(functions, args.repeats, args.warmup)
            memory = None
            if not args.no_memory and "mlsae" in names:
                script = str(Path(__file__).resolve())
                threads = ["--threads", str(args.threads)] if args.threads else []
                child_args = [script, "--memory-child", str(shape_index), str(dead_fraction)]
                memory = json.loads(run_isolated(child_args + threads).strip().splitlines()[-1])
            n_inputs, n_latents = encoder.shape[1], encoder.shape[0]
            rows.append(
                {
                    "n_inputs": n_inputs,
                    "n_latents": n_latents,
                    "n_vectors": flat.shape[0],
                    "k": k,
                    "auxk": auxk,
                    "dead_fraction": dead_fraction,
                    "timings": timings,
                    "parity": parity,
                    "memory": memory,
                }
            )
            print_row(rows[-1])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_note(), "repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2))
    print_table(rows)
    print(f"\nthreads: {torch.get_num_threads()}; wrote {args.out}")


def print_row(row: dict) -> None:
    cells = ", ".join(f"{n} {t['median_s'] * 1e3:.0f} ms" for n, t in row["timings"].items())
    print(f"# {row['n_latents']} latents, dead {row['dead_fraction']:.0%}: {cells}", flush=True)


def print_table(rows: list[dict]) -> None:
    print(
        "\n| latents | vectors | dead | implementation | median ms | x floor"
        " | x prealloc floor | x mlsae |\n|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        timings = row["timings"]
        for name, timing in timings.items():
            ratios = [
                f"{paired_ratio(timings, name, reference):.2f}" if reference in timings else "-"
                for reference in ("floor", "floor_prealloc", "mlsae")
            ]
            print(
                f"| {row['n_latents']} | {row['n_vectors']} | {row['dead_fraction']:.0%} | {name}"
                f" | {timing['median_s'] * 1e3:.0f} | {' | '.join(ratios)} |"
            )
    print(
        "\n| latents | dead | step's decode share | decode() share | peak MiB | allowance MiB"
        " | peak/allow |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        timings = row["timings"]
        shares = [
            f"{paired_ratio(timings, name, 'mlsae'):.1%}"
            if name in timings and "mlsae" in timings
            else "-"
            for name in ("step_decode", "decode")
        ]
        memory = row["memory"]
        if memory:
            peak, allowance = memory["peak_bytes"] / 2**20, memory["allowance_bytes"] / 2**20
            mem = f"{peak:.0f} | {allowance:.0f} | {peak / allowance:.2f}"
        else:
            mem = "- | - | -"
        print(f"| {row['n_latents']} | {row['dead_fraction']:.0%} | {' | '.join(shares)} | {mem} |")


if __name__ == "__main__":
    main()
