"""The peak memory of a sweep in one run against that of its SAEs' separate runs.

Each run is a process of its own (its peak resident set, `ru_maxrss`, is the figure): the
sweep of `bench/sweep.py`'s SAEs, then each SAE's separate run, on the same
Pythia-70m-shaped random model and data. Reported: the sweep's peak, every separate run's,
their sum (what the SAEs take when run side by side) and their largest (one at a time).

    python bench/sweep_memory.py [--sizes 3 9] [--steps 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_note  # noqa: E402
from bench.sweep import SIZES, base_args, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peak_mib(code: str) -> float:
    """The peak resident memory, in MiB, of a Python process running `code`."""
    script = f"{code}\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 9])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    prelude = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"torch.set_num_threads({args.threads})\n"
        "from mlsae.cli import parse\n"
        "from mlsae.trainer.config import RunConfig\n"
        "from mlsae.trainer.sweep import train_sweep\n"
        "from mlsae.trainer.sweep_options import sweep_members\n"
        "from mlsae.trainer.train import train\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "pythia-70m-random")
        for size in args.sizes:
            factors, ks = SIZES[size]
            run_dir = Path(tmp) / f"runs-{size}"
            argv = [*base_args(args, model, run_dir), "--expansion_factor", *factors, "-k", *ks]
            sweep = peak_mib(f"{prelude}train_sweep({argv!r}, lambda index, name: [])")
            separate = [
                peak_mib(
                    f"{prelude}member = sweep_members({argv!r})[0][{index}]\n"
                    "train(parse(RunConfig, member.args), [])"
                )
                for index in range(size)
            ]
            rows.append(
                {
                    "saes": size,
                    "sweep_peak_mib": round(sweep),
                    "separate_peaks_mib": [round(m) for m in separate],
                    "separate_sum_mib": round(sum(separate)),
                    "separate_max_mib": round(max(separate)),
                    "sweep_over_sum": round(sweep / sum(separate), 2),
                }
            )
    print(json.dumps({"machine": machine_note(), "options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
