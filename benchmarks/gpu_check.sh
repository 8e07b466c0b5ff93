#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one command, one JSON report, under 8 minutes on
# one H100/H200. Parts that need what this machine lacks (a GPU, TensorRT, onnxruntime-gpu,
# the train extra) are skipped with the reason. Needs no network and nothing outside the
# repository checkout.
#   bash benchmarks/gpu_check.sh [REPORT.json]        (default: gpu_check.json)
# PYTHON picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE=1
# the repository on the path, so a machine without `pip install -e .` runs it too
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PYTHON" -m benchmarks.gpu_check --out "$out" --budget-s "${GPU_CHECK_BUDGET_S:-420}"
