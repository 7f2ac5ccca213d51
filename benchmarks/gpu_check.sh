#!/usr/bin/env bash
# One prepared check of the diffusion stages for a lent GPU (see the device tool's README):
# SD-1.4-shaped components from data/sd14_configs/ (random weights): stage 1 images/s in fp32/bf16 and
# its largest batch, fp32 vs bf16 vs fp16 rows, stage 4 images/s in fp16/bf16, ResNet-34 steps/s in
# fp32/bf16, fractions of the card's rate and plan's projection at the measured rates (see gpu_check.py).
# One JSON line, also written to $OUT/gpu_check.json.
#
#   here, with PyPI:     bash benchmarks/gpu_check.sh fetch   # wheels the GPU image lacks → .gpu-wheels/
#   on the GPU machine:  bash benchmarks/gpu_check.sh [gpu_check.py options]
#                        (pass .gpu-wheels as a carried path; it must be git-ignored)
#
# The GPU image has torch, transformers, accelerate, safetensors, tqdm, numpy, PIL; it lacks
# diffusers and omegaconf, which are installed from .gpu-wheels/ when missing. Sized for ≤ 8 min on an H100/H200
# (not yet run on one: no device was lent to the sessions so far).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [ "${1:-}" = "fetch" ]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform any -d "$WHEELS" \
        diffusers==0.42.1 omegaconf==2.3.0 PyYAML
    python3 -m pip download --no-deps --no-binary=:all: -d "$WHEELS" antlr4-python3-runtime==4.9.3
    ls -la "$WHEELS"
    exit 0
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, omegaconf" 2>/dev/null; then
    [ -d "$WHEELS" ] || { echo "diffusers/omegaconf missing and no $WHEELS/: run 'bash $0 fetch' first and carry it" >&2; exit 2; }
    "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps -q "$WHEELS"/*
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# the device tool brings back what is written under $OUT
HF_HUB_OFFLINE=1 TQDM_DISABLE=1 "$PY" benchmarks/gpu_check.py --json-out "${OUT:-outputs}/gpu_check.json" "$@"
