#!/usr/bin/env bash
# The prepared GPU check (issue 15): benchmarks/gpu_suite.py once on the GPU machine, unattended, in under
# 4 minutes; every file it writes lands in $OUT (the device tool brings that folder back).
#
# From a session that has a GPU, with the device tool (repository root, working tree only):
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=300)
# Extra arguments go to the suite, e.g. the whole-network compile of LFDL alone (a second run, if time is left):
#     run(command="bash benchmarks/gpu_check.sh --only lfdl --configs bf16_cl_compile --compile-scope model --budget-s 240", timeout_s=300)
# Elsewhere: OUT=/tmp/me/gpu bash benchmarks/gpu_check.sh
#
# Limits: the suite's own budget (--budget-s 200: measurements, compiles time-limited from what is left) plus its
# imports and data (~20 s); `timeout 270` stops anything that still hangs, and the JSON / Markdown written after
# each measurement stay. 300 s for the tool leaves a rerun within a 15-minute lease after the machine's start.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-results/gpu_suite}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
{
  date -Is
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())" 2>&1
} > "$OUT_DIR/machine.txt"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
timeout -k 10 270 "$PY" benchmarks/gpu_suite.py --out "$OUT_DIR" --profile --budget-s 200 "$@" 2>&1 \
  | grep -v "^W[0-9]\{4\} " | tee "$OUT_DIR/gpu_suite.log"
rc=${PIPESTATUS[0]}
echo "gpu_suite exit status: $rc" | tee -a "$OUT_DIR/gpu_suite.log"
cat "$OUT_DIR/gpu_suite.md" 2>/dev/null || echo "no gpu_suite.md written"
exit "$rc"
