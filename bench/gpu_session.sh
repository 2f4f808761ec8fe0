#!/usr/bin/env bash
# Everything a lent GPU should run (device time is scarce and each start costs minutes):
#   tests  what the compiler made of each kernel, the compiled kernel/backend tests, and the
#          engine's --device cuda path against the reference (several hundred kernel
#          compilations: minutes)
#   bench  the kernel benchmark (GB/s vs the device-to-device copy of the same run, the hot-bin
#          tuning sweep) and end-to-end merges on cuda vs cpu vs the reference
#   scaling  the CPU backend over 1-16 cores, threads and worker processes (bench/cpu_threads.py,
#          ~3 minutes; no GPU needed, but only the lent machine has 16 cores): run it if device
#          time is left after the first two
# The device tool stops a command after 10 minutes, so give each stage its own command:
#   bash bench/gpu_session.sh "$OUT" tests   then   ... "$OUT" bench   then   ... "$OUT" scaling
# (no stage: all, for a machine without that limit). Then commit "$OUT"/*.json under
# bench/results/. Each stage writes one log plus at most 4 JSON/PNG files (the tool brings 8 back).
set -uo pipefail
out=${1:-bench/results}
stage=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

if [[ $stage == tests || $stage == all ]]; then
    log="$out/tests.log"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
        2>&1 | tee "$log"
    # What the compiler made of every kernel variant on this Triton (registers, spills, load widths).
    python3 bench/compile_check.py --json "$out/compile.json" 2>&1 | tee -a "$log"
    # Compiled kernels vs the reference (the interpreter runs these same cases in CI), then the
    # engine's --device cuda path end to end.
    # Triton compiles each specialization on first use, one at a time per process: spread the
    # tests over 8 processes where pytest-xdist is installed (it is on the lent machines).
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    python3 -m pytest -q -p no:cacheprovider $parallel tests/test_kernels.py tests/test_triton_backend.py \
        tests/test_rng.py tests/test_selection.py tests/test_methods.py tests/test_gpu_engine.py 2>&1 | tee -a "$log"
fi

if [[ $stage == bench || $stage == all ]]; then
    log="$out/bench.log"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
        2>&1 | tee "$log"
    python3 bench/bench_kernels.py --json "$out/kernels.json" 2>&1 | tee -a "$log"
    lines-fast bench --workload llama-336m --methods ties,task_arithmetic --devices cuda,cpu --compare reference \
        --repeats 3 --out "$out" 2>&1 | tee -a "$log"
fi

if [[ $stage == scaling || $stage == all ]]; then
    log="$out/scaling.log"
    # The CPU backend's scaling on this machine's 16 cores (issue 15's target: >= 0.8 x linear):
    # one process with all the threads, and 4 worker processes sharing them (64 MB shards: 11, so
    # each worker has some); one run per case.
    python3 bench/cpu_threads.py --threads 1,2,4,8,16 --workers 1,4 --max-shard-size 64MB --repeats 1 \
        --out "$out" 2>&1 | tee "$log"
fi
