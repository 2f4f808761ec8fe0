#!/usr/bin/env bash
# Everything a lent GPU should run, in one command (device time is scarce and each start costs
# minutes): what the compiler made of each kernel, the GPU-marked tests and the kernel/backend
# tests compiled, the kernel benchmark (GB/s vs the device-to-device copy of the same run), and
# end-to-end merges on cuda vs cpu.
# Usage, from the repository root on the GPU machine:  bash bench/gpu_session.sh "$OUT"
# Then commit "$OUT"/*.json under bench/results/. Writes session.log plus at most 4 JSON/PNG
# files (the device tool brings back 8 at most).
set -uo pipefail
out=${1:-bench/results}
mkdir -p "$out"
log="$out/session.log"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$log"
# What the compiler made of every kernel variant on this Triton (registers, spills, load widths).
python3 bench/compile_check.py --json "$out/compile.json" 2>&1 | tee -a "$log"
# Compiled kernels vs the reference (the interpreter runs these same cases in CI).
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_backend.py tests/test_rng.py \
    tests/test_selection.py tests/test_engine.py -k "not interpreter" 2>&1 | tee -a "$log"
# The engine's --device cuda path end to end against the reference.
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py 2>&1 | tee -a "$log"
python3 bench/bench_kernels.py --json "$out/kernels.json" 2>&1 | tee -a "$log"
lines-fast bench --workload llama-336m --methods ties,task_arithmetic --devices cuda,cpu --compare reference \
    --repeats 3 --out "$out" 2>&1 | tee -a "$log"
