"""mergekit's other methods: hand-computed cases for the reference, mergekit 0.1.5's rule written
out independently (sort-based, as its source does) on tie-free data, both backends on the
hand cases, and the bad-input errors. The registry-derived matrix (test_methods.py) covers
every option against the reference on every backend."""
from __future__ import annotations

import math

import pytest
import torch

from lines_fast import reference as ref
from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.errors import MergeInputError
from lines_fast.plan import ElementPlan
from lines_fast.spec import band_ranks, make_spec

F32 = torch.float32


def merge_one(method, base, models, backend=None, **params):
    """theta for one tensor "w" (float32 output), by the reference or by a backend."""
    spec = ref.spec_from_params(method, len(models), **params)
    if backend is None:
        return ref.merge_with_spec({"w": base}, [{"w": m} for m in models], spec, out_dtype=F32)["w"]
    plan = ElementPlan.from_spec(spec)
    job = MergeJob("w", base, models, None, spec.lam, F32)
    ((_, out, _),) = list(backend.merge_many([job], plan))
    return out


def backends():
    yield CpuBackend(chunk=4)
    pytest.importorskip("triton")
    from lines_fast.backends.triton_backend import TritonBackend, import_kernels

    kmerge, _ = import_kernels()
    if kmerge._interpreted(kmerge._fused_merge_kernel):
        yield TritonBackend("interpret")
    elif torch.cuda.is_available():
        yield TritonBackend("cuda")


# ---------------------------------------------------------------------------------------
# breadcrumbs
# ---------------------------------------------------------------------------------------

TAU = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, -0.25, 0.125, 6.0])


def test_band_ranks_follow_mergekit_counts():
    assert band_ranks(0.5, 0.1, 10) == (6, 1)      # drop the top 1, keep the next 5
    assert band_ranks(0.5, 0.0, 10) == (5, 0)      # gamma 0: no ceiling
    assert band_ranks(0.05, 0.1, 10) == (0, 1)     # floor(0.5) = 0 kept: nothing (no minimum of one)
    assert band_ranks(1.0, 0.3, 10) == (10, 0)     # density 1: the tensor as it is, whatever gamma


def test_breadcrumbs_hand_example():
    """gamma 0.1, density 0.5 of 10 values: 6 (the top one) goes, 5 -4 3 -2 1 stay, the rest go."""
    base = torch.zeros(10)
    want = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0, 0, 0, 0, 0])
    assert torch.equal(merge_one("breadcrumbs", base, [base + TAU], density=0.5, gamma=0.1), want)
    for backend in backends():
        assert torch.equal(merge_one("breadcrumbs", base, [base + TAU], backend, density=0.5, gamma=0.1), want)


def test_breadcrumbs_ties_at_both_thresholds():
    """Ties at the ceiling all go, ties at the floor all stay (the documented difference from
    mergekit's sort, which splits a tie arbitrarily)."""
    base = torch.zeros(8)
    tau = torch.tensor([3.0, -3.0, 2.0, 2.0, -2.0, 1.0, 1.0, 0.5])
    # d = 8, gamma 0.125: the 1st largest (3) is the ceiling -> both 3s go; density 0.25 -> the
    # 3rd largest (2) is the floor -> all three 2s stay.
    want = torch.tensor([0.0, 0.0, 2.0, 2.0, -2.0, 0.0, 0.0, 0.0])
    assert torch.equal(merge_one("breadcrumbs", base, [tau], density=0.25, gamma=0.125), want)
    for backend in backends():
        assert torch.equal(merge_one("breadcrumbs", base, [tau], backend, density=0.25, gamma=0.125), want)


def mergekit_magnitude_outliers(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's rule as its source states it: sort |tau| ascending, keep positions
    [n_bot, n_bot + target) with target = int(density d), n_top = int(gamma d)."""
    if density >= 1:
        return tau
    d = tau.numel()
    target, top = int(density * d), int(gamma * d)
    bottom = max(0, d - target - top)
    order = torch.sort(tau.abs().reshape(-1)).indices
    mask = torch.zeros(d)
    mask[order[bottom:bottom + target]] = 1
    return tau * mask.view(tau.shape)


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0), (0.2, 0.3)])
def test_breadcrumbs_equals_mergekit_on_tie_free_data(density, gamma):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 29, generator=g)
    models = [base + torch.randn(37, 29, generator=g) * 0.1 for _ in range(2)]
    weights = [0.7, 1.3]
    got = merge_one("breadcrumbs", base, models, density=density, gamma=gamma, weight=weights)
    want = base + sum(w * mergekit_magnitude_outliers(m - base, density, gamma) for w, m in zip(weights, models))
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    kept = [(mergekit_magnitude_outliers(m - base, density, gamma) != 0).sum() for m in models]
    assert all(int(k) == int(density * base.numel()) for k in kept)


def test_breadcrumbs_ties_is_the_sign_election_on_the_band():
    base = torch.zeros(6)
    models = [torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 9.0]), torch.tensor([-1.0, -1.0, 2.0, 1.0, 2.0, 0.1])]
    # d = 6, gamma 1/6 drops each model's largest, density 0.5 keeps the next 3 (with ties).
    bands = [torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0, 0.0]), torch.tensor([-1.0, -1.0, 0.0, 1.0, 0.0, 0.0])]
    assert torch.equal(merge_one("breadcrumbs", base, models, density=0.5, gamma=1 / 6), bands[0] + bands[1])
    # The election: signs of the sums (0, -3, 3, 1, -1, 0) -> +, -, +, +, -, +; no normalize
    # (mergekit's default for breadcrumbs_ties): the sum of the agreeing values.
    want = torch.tensor([1.0, -3.0, 3.0, 1.0, -1.0, 0.0])
    assert torch.equal(merge_one("breadcrumbs_ties", base, models, density=0.5, gamma=1 / 6), want)
    for backend in backends():
        assert torch.equal(merge_one("breadcrumbs_ties", base, models, backend, density=0.5, gamma=1 / 6), want)


def test_breadcrumbs_refuses_gamma_plus_density_over_one():
    with pytest.raises(MergeInputError, match=r"model 2: gamma 0.3 \+ density 0.8 is more than 1"):
        make_spec("breadcrumbs", 2, model_values={"density": [0.5, 0.8]}, values={"gamma": 0.3})
    make_spec("breadcrumbs", 1, values={"density": 1.0, "gamma": 0.3})  # density 1 keeps all: no overlap
    with pytest.raises(MergeInputError, match=r"gamma 1.0 is outside \[0, 1\)"):
        make_spec("breadcrumbs", 1, values={"gamma": 1.0})
    assert math.isclose(make_spec("breadcrumbs", 1).gammas[0], 0.01)
