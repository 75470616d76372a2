"""Helpers shared by the benchmarks: interleaved timing, machine notes, peak memory."""

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interleaved_medians(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Run every function once per repeat, in turn, and report the median, min and
    max wall times in seconds, and every sample (after `warmup` untimed rounds)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "samples_s": values,
        }
        for name, values in times.items()
    }


def machine_note() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def current_rss_bytes() -> int:
    """The resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (`VmHWM`), since start or the last
    `reset_peak_rss`. Unlike `getrusage`'s, it does not carry over the peak of the process
    that forked this one."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_isolated(args: list[str]) -> str:
    """Run `python <args>` in a fresh process with glibc's mmap threshold lowered, so that
    freed tensors leave the resident set at once and its peak measures the step's memory.
    Returns stdout."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return result.stdout


def paired_ratio(timings: dict[str, dict], name: str, reference: str) -> float:
    """The median over repeats of `name`'s time over `reference`'s in the same repeat:
    steadier than a ratio of medians on a machine whose speed drifts."""
    pairs = zip(timings[name]["samples_s"], timings[reference]["samples_s"], strict=True)
    return statistics.median(a / b for a, b in pairs)
