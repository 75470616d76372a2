"""Time and peak memory of tokenising one very long document: whole, and in pieces.

    python bench/long_document.py [--size_mb 50] [--tokenizer quickstart/model]

Each way runs in a fresh process, which reports the seconds its tokenisation took and
its peak resident set (`ru_maxrss`, and `VmHWM`): tracemalloc does not see the memory of
the Rust tokenizer. The ways:

- `none`: builds the document only, the floor (Python, torch, the tokenizer, the text);
- `whole`: tokenises `EOS + document` in one call, as the token stream did before
  long documents were split;
- `pieces`: `concat_and_tokenize`, which splits documents over `MAX_DOCUMENT_CHARS`
  characters at whitespace.

The document is the quick-start training text repeated to `--size_mb` million
characters. The report also says whether both ways give the same tokens.
"""

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("none", "pieces", "whole")


def long_document(size_mb: float) -> str:
    from mlsae.lm.documents import iter_text_groups

    texts = [
        text
        for group in iter_text_groups(str(ROOT / "quickstart/data/train.jsonl.zst"))
        for text in group
    ]
    unit = "\n\n".join(texts)
    n_chars = int(size_mb * 1_000_000)
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(way: str, size_mb: float, tokenizer_path: str) -> dict[str, object]:
    """Tokenise the document one way, in this process; the figures."""
    import torch

    from mlsae.lm.token_stream import MAX_DOCUMENT_CHARS, concat_and_tokenize, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    document = long_document(size_mb)
    limit = {"none": None, "whole": len(document), "pieces": MAX_DOCUMENT_CHARS}[way]
    start = time.perf_counter()
    tokens = None
    if limit is not None:
        blocks, dropped = concat_and_tokenize([document], tokenizer, 2048, limit)
        tokens = blocks.numel() + dropped
        digest = hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    seconds = time.perf_counter() - start
    return {
        "way": way,
        "chars": len(document),
        "tokens": tokens,
        "kept_blocks_sha256": digest if tokens is not None else None,
        "seconds": round(seconds, 2),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "vm_hwm_mib": round(vm_hwm_bytes() / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, default=50.0)
    parser.add_argument("--tokenizer", default=str(ROOT / "quickstart/model"))
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size_mb, args.tokenizer)))
        return
    results = []
    for way in args.ways:
        command = [sys.executable, __file__, "--child", way, f"--size_mb={args.size_mb}"]
        command.append(f"--tokenizer={args.tokenizer}")
        output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
