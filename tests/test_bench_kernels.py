"""bench/bench_kernels.py runs end to end in Triton's interpreter at a tiny size, so the
script a GPU session runs (bench/gpu_session.sh) cannot break unseen. Its timings mean
nothing here; the test checks the report's structure and the bytes it accounts."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_runs_in_the_interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: the real benchmark runs there instead")
    spec = importlib.util.spec_from_file_location("bench_kernels_smoke", ROOT / "bench" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "REPS_CAP", 1)
    numel, n_models = 3 * 4096 + 17, 3  # ragged: the tail launch too
    result = bench.run_all(numel, n_models, with_reference=True)
    assert "interpreter" in result["device"]
    assert result["merge"]["bytes"] == (n_models + 2) * numel * 2  # N + 1 bf16 inputs, one bf16 output
    assert result["histogram"]["bytes"] == (n_models + 1) * numel * 2
    sm = result["select_merge"]
    assert 0 <= sm["refined_models"] <= n_models
    assert sm["bytes_moved"] == (n_models + 1 + 2 * sm["refined_models"] + n_models + 2) * numel * 2
    for name in ("copy", "merge", "histogram", "histogram_hot64_w4", "histogram_zeros_only", "select_merge",
                 "reference", "backend"):
        assert result[name]["seconds"] > 0, name
    assert result["merge"]["speedup_vs_reference"] > 0
    # one timed launch per newer per-element step: slerp reads the base and one model (as its two
    # inputs, no separate base); the others read the base and the three models
    assert result["variant_slerp"]["bytes"] == 3 * numel * 2
    for name in bench.VARIANTS:
        assert result[f"variant_{name}"]["seconds"] > 0, name
    assert result["variant_breadcrumbs"]["bytes"] == (n_models + 2) * numel * 2
