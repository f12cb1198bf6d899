#!/usr/bin/env bash
# The checks that need a GPU, in one run on a lent machine (docs/benchmarks.md records the output):
# profiler overhead, apply_to_model on CUDA devices, and the GPU-marked tests.
# Usage: OUT=dir bash benchmarks/device_checks.sh
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/moeplace-device}"; mkdir -p "$out"
nvidia-smi -L 2>&1 | tee "$out/machine.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/machine.txt"
timeout 150 python3 benchmarks/bench_profiler.py --device cuda --reps 20 --new-tokens 128 2>&1 | tee "$out/profiler.md"
timeout 120 python3 benchmarks/bench_apply_model.py --device cuda --reps 10 2>&1 | tee "$out/apply_model.md"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/profiling/test_recorder.py tests/placement/test_in_memory.py 2>&1 | tail -5 | tee "$out/gpu_tests.txt"
