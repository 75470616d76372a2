"""End-to-end training throughput on a Pythia-70m-shaped model, with a per-phase breakdown.

The transformer is a GPT-NeoX with Pythia-70m's config (6 layers, d_model 512, 8 heads,
vocabulary 50,304) and random weights, so nothing is downloaded; sequences of 256 random
tokens, batch 2, one optimizer step per batch. The step mirrors
`MLSAETransformer.training_step` and `on_before_optimizer_step` (residual stream, special
positions masked, MLSAE forward, FVU and AuxK losses, firing counts, training metrics,
backward, fused decoder maintenance, fused Adam, dead-latent update) without Lightning's
loop. Phases, timed with `time.perf_counter` (PyTorch on the CPU runs synchronously):

- data: drawing the token batch; lm: the transformer's residual stream (no grad);
- forward: `MLSAE.forward_standardized` (standardisation, the encoder matmul, the decodes)
  without its top-k; topk: the top-k calls inside it (`fast_topk`, timed by a wrapper);
- loss: the FVU and AuxK losses; backward; maintenance: `maintain_decoder`;
- optimizer: Adam; metrics: firing counts, the training metrics and the dead-latent update.

"overhead" is data + metrics: the time beyond the LM forward and the SAE step.

    python bench/end_to_end.py [--threads 2] [--steps 8] [--dead 0.5]
"""

import argparse
import json
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

import mlsae.sparse.encoder as encoder_module  # noqa: E402
from bench.common import machine_note  # noqa: E402
from mlsae.lm.transformer import Transformer  # noqa: E402
from mlsae.metrics import (  # noqa: E402
    DeadLatents,
    LayerwiseFVU,
    LayerwiseL0Norm,
    LayerwiseL1Norm,
    LayerwiseMSE,
    LayerwiseWrapper,
)
from mlsae.model.autoencoder import MLSAE  # noqa: E402
from mlsae.model.losses import auxk_loss, layerwise_fvu  # noqa: E402
from mlsae.model.maintenance import maintain_decoder  # noqa: E402
from mlsae.sparse import make_adam  # noqa: E402

PYTHIA_70M = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    vocab_size=50304,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--expansion-factor", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--auxk", type=int, default=256)
    parser.add_argument("--dead", type=float, default=0.5, help="share of latents forced dead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/end_to_end.json"))
    return parser.parse_args()


class Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] += now - self.start
        self.start = now


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M))
    tokenizer = types.SimpleNamespace(bos_token_id=0, eos_token_id=0, pad_token_id=None)
    transformer = Transformer(
        "pythia-70m-random",
        max_length=args.seq,
        batch_size=args.batch_size,
        model=model,
        tokenizer=tokenizer,
    )
    d_model, n_layers = transformer.d_model, transformer.n_layers
    n_latents = d_model * args.expansion_factor
    autoencoder = MLSAE(d_model, n_latents, args.k, auxk=args.auxk, dead_tokens_threshold=10**7)
    n_dead = int(args.dead * n_latents)
    with torch.no_grad():
        autoencoder.tokens_since_fired[torch.randperm(n_latents)[:n_dead]] = 10**12
    optimizer = make_adam(autoencoder.parameters(), lr=1e-4, eps=6.25e-10)
    layers = list(range(n_layers))
    metrics = MetricCollection(
        {
            "dead/rel": DeadLatents(n_latents, 10**7),
            "fvu": LayerwiseWrapper(LayerwiseFVU(n_layers), layers, "fvu/"),
            "l0": LayerwiseWrapper(LayerwiseL0Norm(n_layers), layers, "l0/"),
            "l1": LayerwiseWrapper(LayerwiseL1Norm(n_layers), layers, "l1/"),
            "mse": LayerwiseWrapper(LayerwiseMSE(n_layers), layers, "mse/"),
        },
        prefix="train/",
    )

    fast_topk = encoder_module.fast_topk
    topk_time = [0.0]

    def timed_topk(x, k, use_native=False):
        start = time.perf_counter()
        result = fast_topk(x, k, use_native)
        topk_time[0] += time.perf_counter() - start
        return result

    encoder_module.fast_topk = timed_topk

    def step(timer: Timer) -> None:
        tokens = torch.randint(1, PYTHIA_70M["vocab_size"], (args.batch_size, args.seq))
        tokens[:, 0] = 0  # a BOS position, masked like the module masks special tokens
        timer.lap("data")
        with torch.no_grad():
            raw = transformer.residual_stream(tokens)
        special = transformer.special_token_mask(tokens)
        mask = ~special
        inputs = raw.masked_fill(special[None, :, :, None], 0.0)
        timer.lap("lm")
        topk_time[0] = 0.0
        result = autoencoder.forward_standardized(inputs)
        timer.lap("forward")
        timer.totals["forward"] -= topk_time[0]
        timer.totals["topk"] += topk_time[0]
        output = result.output
        topk, recons = output.topk, output.recons
        loss = layerwise_fvu(inputs, recons, mask).mean()
        if output.auxk.values.shape[-1] > 0:
            error = result.inputs - result.recons
            loss = loss + auxk_loss(error, output.auxk_recons, mask) / 32
        timer.lap("loss")
        fired = autoencoder.fired_counts(topk, mask)
        metrics(
            inputs=inputs,
            recons=recons.detach(),
            values=topk.values.detach(),
            indices=topk.indices,
            mask=mask,
        )
        timer.lap("metrics")
        loss.backward()
        timer.lap("backward")
        maintain_decoder(autoencoder.decoder)
        timer.lap("maintenance")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.lap("optimizer")
        autoencoder.update_dead_latents(fired * 0, mask.sum())  # keep the forced-dead share
        timer.lap("metrics")

    for _ in range(args.warmup):
        step(Timer())
    per_step: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.steps):
        timer = Timer()
        step(timer)
        for name, value in timer.totals.items():
            per_step[name].append(value)
        per_step["total"].append(sum(timer.totals.values()))
    encoder_module.fast_topk = fast_topk

    medians = {name: statistics.median(values) for name, values in per_step.items()}
    total = medians["total"]
    overhead = medians["data"] + medians["metrics"]
    tokens_per_step = args.batch_size * args.seq
    print("| phase | median ms / step | share |\n|---|---|---|")
    for name in (
        "data",
        "lm",
        "forward",
        "topk",
        "loss",
        "backward",
        "maintenance",
        "optimizer",
        "metrics",
        "total",
    ):
        print(f"| {name} | {medians[name] * 1e3:.1f} | {medians[name] / total:.1%} |")
    sae = total - overhead - medians["lm"]
    print(
        f"\ntokens/s: {tokens_per_step / total:.0f} ({tokens_per_step} tokens per step);"
        f" overhead beyond LM forward + SAE step: {overhead / (medians['lm'] + sae):.1%}"
        f"\nthreads: {torch.get_num_threads()}; {n_latents} latents, {n_dead} forced dead"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_note(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "median_s": medians,
                "tokens_per_s": tokens_per_step / total,
                "overhead_share": overhead / (medians["lm"] + sae),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
