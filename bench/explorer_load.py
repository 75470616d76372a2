"""Load on the explorer: its resident memory over many distinct requests, then its
throughput and latency with many requests in flight.

Starts the explorer in a child process on 127.0.0.1 (by default a random MLSAE over the
quick-start language model in quickstart/model, so nothing needs training; or a trained
one with --repo_id), then:

(a) sends `--distinct` requests, each with a new prompt, in turn over the routes the page
    uses (top_n 100 where a route takes it), and records the server's resident set size
    (VmRSS, from /proc) before, after every `--every` requests and at the end;
(b) sends `--requests` requests with `--in_flight` of them at a time, as pages would:
    each new prompt asked of every route, and reports requests per second and the 50th
    and 99th percentile and the largest latency.

Run from the repository root:  python bench/explorer_load.py
To measure another copy of the package, put it first on PYTHONPATH; the server inherits it.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOP_N = 100
WORDS = (
    "the a of and to in is was for on that with as by it at from his her they this which "
    "river city music light paper garden winter market history science water stone forest "
    "station story engine island window morning summer letter animal number person school "
    "ran saw made built found wrote opened carried watched followed called changed moved "
    "old new small large early late quiet bright dark cold warm green red long short"
).split()


def page_requests(prompt: str, index: int) -> list[tuple[str, dict]]:
    """The requests the page makes for one prompt, with top_n raised to 100."""
    latent, layer = index % 1024, index % 4
    return [
        ("/api/activations", {"prompt": prompt}),
        ("/api/histograms", {"prompt": prompt, "bins": 32}),
        ("/api/metrics", {"prompt": prompt}),
        ("/api/latent", {"prompt": prompt, "latent": latent}),
        ("/api/examples", {"latent": latent, "limit": 12}),
        ("/api/logits", {"prompt": prompt, "top_n": TOP_N}),
        ("/api/logits/reconstruction", {"prompt": prompt, "layer": layer, "top_n": TOP_N}),
        (
            "/api/logits/steering",
            {"prompt": prompt, "latent": latent, "layer": layer, "factor": 5, "top_n": TOP_N},
        ),
    ]


PROMPT_ROUTES = 7
"""The routes of `page_requests` that take a prompt (all but the examples)."""


def make_prompt(index: int, n_words: int) -> str:
    words = random.Random(index).choices(WORDS, k=n_words)
    return f"{index}: " + " ".join(words) + "."


def distinct_requests(count: int, n_words: int) -> list[tuple[str, dict]]:
    """`count` requests, each with a prompt of its own, over the page's prompt routes."""
    requests = []
    for index in range(count):
        routes = [
            item
            for item in page_requests(make_prompt(index, n_words), index)
            if "prompt" in item[1]
        ]
        requests.append(routes[index % PROMPT_ROUTES])
    return requests


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    if args.repo_id:
        command = ["-m", "mlsae.explorer", "--repo_id", args.repo_id, "--port", str(port)]
    else:
        command = [str(Path(__file__).resolve()), "--serve", "--port", str(port)]
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, *command], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
        )


def wait_until_up(client: httpx.Client, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/api/params").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start in 10 minutes")


def send(client: httpx.Client, request: tuple[str, dict]) -> float:
    """Seconds until the whole answer arrived; fails on anything but 200."""
    path, body = request
    start = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return elapsed


def memory_phase(client: httpx.Client, pid: int, args: argparse.Namespace) -> list[dict]:
    records = [{"requests": 0, "rss_mib": rss_mib(pid)}]
    print(f"RSS before: {records[0]['rss_mib']:.0f} MiB", flush=True)
    start = time.perf_counter()
    for count, request in enumerate(distinct_requests(args.distinct, args.words), start=1):
        send(client, request)
        if count % args.every == 0 or count == args.distinct:
            records.append({"requests": count, "rss_mib": rss_mib(pid)})
            elapsed = time.perf_counter() - start
            print(f"after {count:4d}: RSS {records[-1]['rss_mib']:7.0f} MiB  ({elapsed:.0f} s)")
    return records


def concurrency_phase(client: httpx.Client, args: argparse.Namespace) -> dict:
    requests = []
    index = args.distinct
    while len(requests) < args.requests:
        requests += page_requests(make_prompt(index, args.words), index)
        index += 1
    requests = requests[: args.requests]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.in_flight) as pool:
        latencies = sorted(pool.map(lambda request: send(client, request), requests))
    wall = time.perf_counter() - start
    return {
        "requests": len(requests),
        "in_flight": args.in_flight,
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * len(latencies)) - 1)],
        "max_s": latencies[-1],
    }


def serve(port: int) -> None:
    """The child: a random MLSAE over the quick-start model, served on 127.0.0.1."""
    import torch
    import uvicorn

    import mlsae
    from mlsae.explorer import create_app
    from mlsae.model.lightning import MLSAETransformer

    print(f"serving the explorer of {Path(mlsae.__file__).parent}", flush=True)
    torch.manual_seed(0)
    model = MLSAETransformer(
        model_name=str(ROOT / "quickstart" / "model"), expansion_factor=16, k=16, max_length=128
    )
    app = create_app(model, repo_id="random MLSAE over quickstart/model")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo_id", default=None, help="A trained model (default: random).")
    parser.add_argument("--distinct", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--in_flight", type=int, default=20)
    parser.add_argument("--words", type=int, default=60, help="Words per prompt.")
    parser.add_argument("--out", default="bench/results/explorer_load.json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="mlsae-explorer-load-")) / "server.log"
    server = start_server(args, port, log)
    limits = httpx.Limits(max_connections=args.in_flight, max_keepalive_connections=args.in_flight)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
        ) as client:
            wait_until_up(client, server, log)
            print(log.read_text().splitlines()[0] if log.read_text() else "", flush=True)
            memory = memory_phase(client, server.pid, args)
            load = concurrency_phase(client, args)
            load["rss_after_mib"] = rss_mib(server.pid)
            tokens = client.post("/api/tokenize", json={"prompt": make_prompt(0, args.words)})
            n_tokens = len(tokens.json()["tokens"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"{load['requests']} requests, {load['in_flight']} in flight: "
        f"{load['requests_per_s']:.1f} requests/s, p50 {load['p50_s'] * 1000:.0f} ms, "
        f"p99 {load['p99_s'] * 1000:.0f} ms, max {load['max_s'] * 1000:.0f} ms; "
        f"RSS after {load['rss_after_mib']:.0f} MiB; prompts of about {n_tokens} tokens"
    )
    result = {"memory": memory, "load": load, "prompt_tokens": n_tokens, "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
