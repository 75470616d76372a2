"""Build the offline quick start: a small causal LM, its tokenizer and a corpus to train on.

Everything comes from text that every Python installation has, the docstrings of the
standard library, so nothing is downloaded:

1. Collect the docstrings (`inspect.getdoc`) of a fixed list of stdlib modules, their
   submodules, their public classes and functions, and the public members of those
   classes, in sorted order; keep ASCII ones of at least `--min_chars` characters, once each.
2. Split them into train / validation / test (90 / 5 / 5) by a hash of their text.
3. Train a byte-level BPE tokenizer on the train split, with `<|endoftext|>` as id 0 for
   BOS and EOS, like Pythia's.
4. Train a small GPT-NeoX on the train split, joined as `EOS + doc + EOS + doc ...` (as the
   mlsae data pipeline joins documents) and cut into blocks of the context length.
5. Write `<output>/model/` (model in float32 safetensors and tokenizer),
   `<output>/data/{train,validation,test}.jsonl.zst` (one `{"text": ..., "meta": {}}` per
   line, as in the Pile) and `<output>/README.md`.

The corpus depends on the Python version (docstrings change between releases); the same
Python, torch and options give the same files.

    python scripts/build_quickstart.py --output quickstart
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from quickstart_corpus import collect_docstrings, split_of, write_jsonl_zst  # noqa: E402

EOS = "<|endoftext|>"
SPLITS = ("train", "validation", "test")


# Top-level stdlib modules present on Linux, macOS and Windows in Python 3.10 to 3.13, minus
# those that act when imported (this, antigravity), need a GUI (tkinter, turtle, idlelib),
# are tests, or were removed in 3.12 / 3.13. Modules missing on a platform are skipped.
def train_tokenizer(
    documents: list[str], vocab_size: int, context_length: int
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `<|endoftext|>` (id 0) as its BOS and EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=context_length,
    )


def token_blocks(
    documents: list[str], tokenizer: PreTrainedTokenizerFast, context_length: int
) -> torch.Tensor:
    """`EOS + doc + EOS + doc ...` tokenised and cut into whole blocks (the rest dropped)."""
    text = EOS + EOS.join(documents)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_kept = len(ids) // context_length * context_length
    return torch.tensor(ids[:n_kept], dtype=torch.long).view(-1, context_length)


def build_model(args: argparse.Namespace, vocab_size: int) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.context_length,
        rotary_pct=args.rotary_pct,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config)


@torch.no_grad()
def mean_loss(model: GPTNeoXForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """The mean next-token loss over `blocks`, weighting every predicted token equally."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in blocks.split(batch_size):
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train(was_training)
    return total / len(blocks)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then a cosine decay to a tenth of the peak."""
    warmup = max(1, round(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(
    model: GPTNeoXForCausalLM,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Train on shuffled blocks (reshuffled every epoch); return the final losses."""
    generator = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_in" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed_in" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    eval_train_blocks = train_blocks[: max(len(val_blocks), 1)]
    order = torch.randperm(len(train_blocks), generator=generator)
    position = 0
    running = None
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if position + args.batch_size > len(order):
            order = torch.randperm(len(train_blocks), generator=generator)
            position = 0
        batch = train_blocks[order[position : position + args.batch_size]]
        position += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            message = (
                f"step {step + 1}/{args.steps}  lr {learning_rate(step, args):.2e}  "
                f"train loss (smoothed) {running:.3f}  {time.perf_counter() - start:.0f}s"
            )
            if (step + 1) % args.eval_every == 0 or last:
                message += f"  validation loss {mean_loss(model, val_blocks, args.batch_size):.3f}"
            print(message, flush=True)
    model.eval()
    return {
        "train_loss": mean_loss(model, eval_train_blocks, args.batch_size),
        "validation_loss": mean_loss(model, val_blocks, args.batch_size),
        "train_seconds": time.perf_counter() - start,
        "epochs": args.steps * args.batch_size / len(train_blocks),
    }


def file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def write_readme(
    output: Path,
    args: argparse.Namespace,
    model: GPTNeoXForCausalLM,
    counts: dict[str, tuple[int, int, int]],
    results: dict[str, float],
) -> None:
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    command = shlex.join(["python", "scripts/build_quickstart.py", *sys.argv[1:]])
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    )
    rows = "\n".join(
        f"| `{split}` | {counts[split][0]:,} | {counts[split][1]:,} | {counts[split][2]:,} | "
        f"{file_size(output / 'data' / f'{split}.jsonl.zst')} |"
        for split in SPLITS
    )
    text = f"""# Quick start model and corpus

A small causal language model, its tokenizer and a corpus of documents, all built offline
from the docstrings of the Python standard library, so that an MLSAE can be trained on a
CPU in about a minute with no network. The model is trained (not random), so its residual
stream has real structure, but it is tiny: use it to try the library, not to study models.

- `model/`: a `GPTNeoXForCausalLM` in float32 safetensors and its byte-level BPE
  tokenizer, loadable with `AutoModelForCausalLM.from_pretrained("{output}/model")` and
  `AutoTokenizer.from_pretrained("{output}/model")`.
- `data/train.jsonl.zst`, `data/validation.jsonl.zst`, `data/test.jsonl.zst`: the
  documents, one `{{"text": ..., "meta": {{}}}}` per line, zstd-compressed, like the Pile's
  test split. Read them with `mlsae.lm.data` as any local data: the directory
  `{output}/data` with a split name, or one file.

## How they were made

```
{command}
```

{versions}, {torch.get_num_threads()} CPU threads. The script:

1. collects the docstrings (`inspect.getdoc`) of a fixed list of standard library modules,
   their public submodules, classes and functions, and the public members of those
   classes, in sorted order, and keeps the ASCII ones of at least `--min_chars` characters,
   each once (docstrings differ between Python versions, so another Python gives another
   corpus);
2. splits them 90 / 5 / 5 into train, validation and test by a SHA-256 hash of the text;
3. trains a byte-level BPE tokenizer on the train split; `<|endoftext|>` is id 0 and both
   the BOS and the EOS token, as in Pythia;
4. trains the model on the train split, joined as `EOS + doc + EOS + doc ...` and cut into
   blocks of the context length, with AdamW (betas 0.9, 0.95), a linear warmup and a
   cosine decay to a tenth of the peak learning rate.

| training | |
| --- | --- |
| steps | {args.steps:,} |
| batch | {args.batch_size} blocks of {args.context_length} tokens |
| epochs | {results["epochs"]:.1f} |
| peak learning rate | {args.lr} |
| warmup | {args.warmup:.0%} of the steps |
| weight decay | {args.weight_decay} |
| seed | {args.seed} |
| time | {results["train_seconds"] / 60:.1f} minutes |

| split | documents | characters | tokens | compressed |
| --- | ---: | ---: | ---: | ---: |
{rows}

## The model

| | |
| --- | --- |
| architecture | GPT-NeoX, parallel residual, rotary on {args.rotary_pct:.0%} of each head |
| layers | {config.num_hidden_layers} |
| hidden size | {config.hidden_size} |
| attention heads | {config.num_attention_heads} |
| MLP size | {config.intermediate_size} |
| vocabulary | {config.vocab_size:,} |
| context length | {config.max_position_embeddings} |
| tied embeddings | no |
| parameters | {n_params:,} |
| size | {file_size(output / "model" / "model.safetensors")} |

Mean next-token loss (nats) over whole blocks: **{results["validation_loss"]:.3f}** on the
validation split and {results["train_loss"]:.3f} on the first blocks of the train split,
against {math.log(config.vocab_size):.3f} for a uniform guess.
"""
    (output / "README.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--rotary_pct", type=float, default=0.25)
    parser.add_argument("--min_chars", type=int, default=32)
    parser.add_argument(
        "--max_documents", type=int, default=None, help="stop collecting after this many"
    )
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    head_dim = args.hidden_size // args.num_heads
    if args.hidden_size % args.num_heads or round(head_dim * args.rotary_pct) % 2:
        raise SystemExit("the head size and its rotary part must be whole and even")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    output: Path = args.output
    (output / "model").mkdir(parents=True, exist_ok=True)
    (output / "data").mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    documents = collect_docstrings(args.min_chars, args.max_documents)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in documents:
        splits[split_of(text)].append(text)
    print(
        f"collected {len(documents):,} docstrings ({sum(map(len, documents)):,} characters) "
        f"in {time.perf_counter() - started:.1f}s: "
        + ", ".join(f"{split} {len(texts):,}" for split, texts in splits.items()),
        flush=True,
    )
    if not all(splits.values()):
        raise SystemExit("every split needs at least one document; allow more documents")
    for split, texts in splits.items():
        write_jsonl_zst(output / "data" / f"{split}.jsonl.zst", texts)

    tokenizer = train_tokenizer(splits["train"], args.vocab_size, args.context_length)
    blocks = {
        split: token_blocks(texts, tokenizer, args.context_length)
        for split, texts in splits.items()
    }
    if len(blocks["train"]) == 0 or len(blocks["validation"]) == 0:
        raise SystemExit("the train and validation splits need a block each; shorten the context")
    counts = {
        split: (
            len(splits[split]),
            sum(map(len, splits[split])),
            len(tokenizer(EOS + EOS.join(splits[split]), verbose=False)["input_ids"]),
        )
        for split in SPLITS
    }
    print(
        f"tokenizer of {len(tokenizer):,} tokens; blocks of {args.context_length}: "
        + ", ".join(f"{split} {len(value):,}" for split, value in blocks.items()),
        flush=True,
    )

    model = build_model(args, len(tokenizer))
    print(f"model of {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    results = train_model(model, blocks["train"], blocks["validation"], args)
    print(
        f"final train loss {results['train_loss']:.3f}, "
        f"validation loss {results['validation_loss']:.3f} "
        f"(uniform {math.log(len(tokenizer)):.3f}), {results['train_seconds']:.0f}s",
        flush=True,
    )

    model.to(torch.float32).save_pretrained(output / "model")
    tokenizer.save_pretrained(output / "model")
    # transformers 5 names the class TokenizersBackend, which transformers 4 cannot load.
    tokenizer_config = output / "model" / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    if not (output / "model" / "model.safetensors").is_file():
        raise SystemExit("save_pretrained wrote no model.safetensors")
    write_readme(output, args, model, counts, results)
    print(f"wrote {output} in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
