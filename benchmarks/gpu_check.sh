#!/usr/bin/env bash
# Training throughput and MFU of the `medium` size on one GPU: bf16, DeepSpeed
# ZeRO stage 2, synthetic tokens, no dataset. Prints one line per arm (no
# memory; short-term + long-term memory) with tokens/s and MFU against the
# 989 TFLOP/s dense bf16 peak of an H100/H200. Extra arguments go to
# benchmarks/gpu_check.py (e.g. --batch-size 16 --segment-len 1024 --compile).
#
#   bash benchmarks/gpu_check.sh
#   CUDA_VISIBLE_DEVICES=3 bash benchmarks/gpu_check.sh --steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible: not run (CPU smoke run: $PY benchmarks/gpu_check.py --cpu --size debug --steps 2)"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# One process, one GPU: the environment a launcher would set.
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29517}"
exec "$PY" benchmarks/gpu_check.py --size medium --zero 2 "$@"
