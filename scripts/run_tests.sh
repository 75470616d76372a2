#!/usr/bin/env bash
# The test suite as CI runs it, on a CPU machine: Chromium for the explorer's browser
# test (Debian's package), the project with its dev extras (torch pinned to the CPU
# build by constraints/cpu.txt), then pytest; then the autoencoder's tests once more on
# the dense reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
pip install -q -c constraints/cpu.txt -e ".[dev]"
CI="${CI:-1}" python -m pytest -q "$@"
if [ $# -eq 0 ]; then
    # The autoencoder's tests once more, every sparse step on the dense reference backend.
    MLSAE_BACKEND=dense CI="${CI:-1}" python -m pytest -q -p no:cacheprovider \
        tests/model/test_autoencoder.py tests/model/test_lightning.py tests/model/test_training_step.py
fi
