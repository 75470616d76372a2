#!/usr/bin/env bash
# The test suite as CI runs it, on a CPU machine: Chromium for the explorer's browser
# test (Debian's package), the project with its dev extras (torch pinned to the CPU
# build by constraints/cpu.txt), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
pip install -q -c constraints/cpu.txt -e ".[dev]"
CI="${CI:-1}" python -m pytest -q "$@"
