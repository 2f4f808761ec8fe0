"""End-to-end merges through `lines_fast.merge` (read, merge, write): `pytest bench/ --benchmark-only`.

The tiny workload always runs; llama-336m (four 0.67 GB bf16 checkpoints, generated once per
session, about a minute) only with LINES_FAST_BENCH_336M=1. LINES_FAST_BENCH_WORKDIR reuses a
directory across sessions, e.g. the one `lines-fast bench --workdir DIR` generated. In-process
timings here leave out interpreter start and imports; `lines-fast bench` measures whole
processes against the reference and mergekit.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import lines_fast
from lines_fast.benchmark import prepare_workload, write_configs

METHODS = ["ties", "task_arithmetic"]
LARGE = pytest.mark.skipif(os.environ.get("LINES_FAST_BENCH_336M") != "1",
                           reason="set LINES_FAST_BENCH_336M=1 to benchmark the llama-336m workload")


def _workload(tmp_path_factory, name: str):
    root = os.environ.get("LINES_FAST_BENCH_WORKDIR")
    work = Path(root) if root else tmp_path_factory.mktemp(f"bench-{name}")
    workload = prepare_workload(name, work)
    return workload, write_configs(workload, METHODS, work / "configs"), work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _workload(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def llama_336m(tmp_path_factory):
    return _workload(tmp_path_factory, "llama-336m")


def _bench(benchmark, workload_tuple, method, rounds):
    workload, configs, work = workload_tuple
    out = work / "outputs" / f"pytest-{method}"

    def merge():
        return lines_fast.merge(configs[method], out, device="cpu", force=True, progress=False,
                                log=lambda message: None)

    result = benchmark.pedantic(merge, rounds=rounds, iterations=1, warmup_rounds=1)
    assert result.merged_tensors > 0
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["input_bytes"] = workload.input_bytes
        benchmark.extra_info["input_gbps"] = round(workload.input_bytes / stats.stats.median / 1e9, 4)


@pytest.mark.parametrize("method", METHODS)
def test_tiny(benchmark, tiny, method):
    _bench(benchmark, tiny, method, rounds=5)


@LARGE
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_llama_336m(benchmark, llama_336m, method):
    _bench(benchmark, llama_336m, method, rounds=2)
