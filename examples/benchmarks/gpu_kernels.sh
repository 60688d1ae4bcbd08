#!/usr/bin/env bash
# The GPU checks of issue 12 as one script (about 8 minutes on an H200): kernel correctness
# on the device, then the per-layer table, then end-to-end decode. Run from the repository root:
#   bash examples/benchmarks/gpu_kernels.sh [OUT_DIR]
set -uo pipefail
out="${1:-${OUT:-/tmp/llmpress-gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_kernels.py -k gpu 2>&1 | tail -20 | tee "$out/tests.txt"
(cd examples/benchmarks && timeout 300 python kernel_speed.py) 2>&1 | tee "$out/kernel_speed.txt"
(cd examples/benchmarks && timeout 300 python generate.py --new-tokens 64) 2>&1 | tail -15 | tee "$out/generate.txt"
