#!/usr/bin/env bash
# Run the test suite in .venv. Services that tests need (a one-node SLURM cluster) are started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
