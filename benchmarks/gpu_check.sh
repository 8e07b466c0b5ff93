#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one command, one JSON report, under 8 minutes on
# one H100/H200. Parts that need what this machine lacks (a GPU, TensorRT, onnxruntime-gpu,
# the train extra) are skipped with the reason. Needs no network and nothing outside the
# repository checkout.
#
#   bash benchmarks/gpu_check.sh --prepare [DIR]          (here, with a package registry: download
#                                                          the cp312 wheels the GPU machine lacks
#                                                          into DIR, default .whl/, at most 60 MiB)
#   bash benchmarks/gpu_check.sh [--wheels DIR] [REPORT]  (there: install from DIR, default .whl/
#                                                          when present, offline; then the check;
#                                                          REPORT defaults to gpu_check.json)
#
# PYTHON picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--prepare" ]; then
  exec "$PYTHON" -m benchmarks.gpu_wheels prepare "${2:-.whl}"
fi
wheels=.whl
if [ "${1:-}" = "--wheels" ]; then wheels="${2:?--wheels needs a folder}"; shift 2; fi
out="${1:-gpu_check.json}"
if [ -f "$wheels/wheels.json" ]; then
  site="$("$PYTHON" -m benchmarks.gpu_wheels install "$wheels")"
  export PYTHONPATH="$PYTHONPATH:$site"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE=1
exec timeout 470 "$PYTHON" -m benchmarks.gpu_check --out "$out" --budget-s "${GPU_CHECK_BUDGET_S:-420}"
