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


# method, its values: every plan step the compiled merge has (sparsifiers, the election, the
# TALL mask, Gram weights and their statistic).
CASES = {
    "ties": ("ties", {"density": DENSITY}),
    "task_arithmetic": ("task_arithmetic", {}),
    "dare_ties": ("dare_ties", {"density": DENSITY}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": DENSITY}),
    "ties_tall": ("ties", {"density": DENSITY, "consensus": {"k": 2, "lambda": 0.4}}),
    "model_stock": ("model_stock", {}),
    # per-row ranks, draws and exact L1 sums in the statistics, then the merge with their keep masks
    "della": ("della", {"density": 0.5, "epsilon": 0.1}),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_merge_many(benchmark, tensors, case, path):
    base, models = tensors
    method, values = CASES[case]
    plan = ElementPlan.from_spec(make_spec(method, N, values=values))
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


@pytest.mark.parametrize("path", PATHS)
def test_slerp(benchmark, tensors, path):
    """slerp of the base and one model: its Gram statistic (a float64 pass) and the weighted sum."""
    base, models = tensors
    plan = ElementPlan.from_spec(make_spec("slerp", 2, values={"t": 0.3}))
    backend = CpuBackend(compiled=path == "compiled")

    def merge():
        job = MergeJob(NAME, None, [base, models[0]], None, 1.0, torch.bfloat16)
        for _, out, _stats in backend.merge_many([job], plan):
            return out

    out = benchmark.pedantic(merge, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == SHAPE
    _record(benchmark, _input_bytes(base, models[:1]))
