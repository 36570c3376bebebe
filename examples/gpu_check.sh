#!/usr/bin/env bash
# The prepared GPU run for compile=True (CUDA graphs): correctness first, then batch-1/16 timings, eager vs
# captured, side by side in one process per model. About 10 minutes on one H100/H200; every stage is bounded.
#
#   bash examples/gpu_check.sh [OUT_DIR]        # default outputs/gpu; then copy the JSON into assets/bench/
#
# Stages: (1) tests/test_cuda.py (bf16 batches, float64 CUDA = CPU, compile=True = eager with no CUDA-graph
# skip); (2) the tiny trained checkpoints at batch 1 (pure launch overhead); (3) LLaDA-8B shape, bf16, random
# init, prompt 256 + 256, 32 steps, batch 1 and 16: none / decoded / prefix / dual, eager and compile=True.
set -uo pipefail
OUT=${1:-outputs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

timeout 240 python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 30 | tee "$OUT/test_cuda.txt"

C="compile=True"
captured=(--extra "none-compiled:$C"
          --extra "decoded-compiled:use_cache=True,cache_type=decoded,cache_steps=4,$C"
          --extra "prefix-compiled:use_cache=True,cache_type=prefix,$C"
          --extra "dual-compiled:use_cache=True,cache_type=dual,$C")
for tiny in tiny-dream tiny-llada; do
  timeout 120 python -m dkvcache.bench_matrix "$tiny" --batches 1 --repeats 3 --out "$OUT" \
    --only none decoded prefix dual "${captured[@]}" 2>&1 | tail -n 20
done
timeout 420 python -m dkvcache.bench_matrix llada-8b --batches 1 16 --steps 32 --repeats 2 --out "$OUT" \
  --only none decoded prefix dual "${captured[@]}" 2>&1 | tail -n 40
ls -la "$OUT"
