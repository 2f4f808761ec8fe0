"""Per-tensor throughput of the CPU backend: `pytest bench/ --benchmark-only`.

One 16M-element bf16 tensor (4096 x 4096, an MLP matrix of a 7B-class model is 45M), a base
and N = 3 fine-tunes whose deltas look like real ones (small, ~30% exact zeros). Each
benchmark reports `input_gbps` in extra_info: bytes of the four input tensors / median time.
`path`: the torch operations, or the compiled kernels (backends/cpu_fused.py, lines_fast/jit.py).
"""
from __future__ import annotations

import pytest
import torch

from lines_fast import jit
from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.plan import ElementPlan
from lines_fast.spec import make_spec

N = 3
SHAPE = (4096, 4096)
DENSITY = 0.2
NAME = "model.layers.0.mlp.up_proj.weight"  # DARE's masks depend on the name


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g).mul_(0.02)
    models = []
    for _ in range(N):
        delta = torch.randn(SHAPE, generator=g).mul_(1e-3)
        delta.masked_fill_(torch.rand(SHAPE, generator=g) < 0.3, 0.0)
        models.append((base + delta).to(torch.bfloat16))
    return base.to(torch.bfloat16), models


def _input_bytes(base, models) -> int:
    return sum(t.numel() * t.element_size() for t in [base, *models])


def _record(benchmark, nbytes: int) -> None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info["input_bytes"] = nbytes
        benchmark.extra_info["input_gbps"] = round(nbytes / median / 1e9, 4)


PATHS = ["torch", pytest.param("compiled", marks=pytest.mark.skipif(jit.kernels() is None, reason="no numba"))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "breadcrumbs_ties"])
def test_merge_many(benchmark, tensors, method, path):
    base, models = tensors
    plan = ElementPlan.from_spec(make_spec(method, N, values={} if method == "task_arithmetic"
                                           else {"density": DENSITY}))
    backend = CpuBackend(compiled=path == "compiled")

    def merge():
        job = MergeJob(NAME, base, models, None, 1.0, torch.bfloat16)
        for _, out, _stats in backend.merge_many([job], plan):
            return out

    out = benchmark.pedantic(merge, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == SHAPE and out.dtype == torch.bfloat16
    _record(benchmark, _input_bytes(base, models))


@pytest.mark.parametrize("path", PATHS)
def test_magnitude_histogram(benchmark, tensors, path):
    """The selection's building block: TIES with tensor scope makes 2 per model (high, then low bits)."""
    base, models = tensors
    backend = CpuBackend(compiled=path == "compiled")
    hist = benchmark.pedantic(lambda: backend.magnitude_histogram(base, models[0]), rounds=5, iterations=1,
                              warmup_rounds=1)
    assert int(hist.sum()) == base.numel()
    _record(benchmark, _input_bytes(base, models[:1]))
