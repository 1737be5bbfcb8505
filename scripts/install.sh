#!/usr/bin/env bash
# Install morphfuse and every dependency into .venv at the repository root (idempotent).
# pyproject.toml holds the compatible ranges; constraints.txt the exact versions the project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.morphfuse-installed
want="$(cat constraints.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip warns about every local index folder it does not find; keep the log readable.
pipq() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq -c constraints.txt -e ".[workflow,diffusion,faces,test]"
pipq --no-deps -c constraints.txt -r requirements-nodeps.txt
echo "$want" > "$stamp"
