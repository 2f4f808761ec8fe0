"""CpuBackend against the reference on inputs chosen to hit its bit-level shortcuts."""
from __future__ import annotations

import pytest
import torch

from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.plan import ElementPlan
from lines_fast.reference import merge_state_dicts, spec_from_params
from lines_fast.tolerance import compare


def _run(method, base, models, chunk=7, **params):
    spec = spec_from_params(method, len(models), **params)
    job = MergeJob("w", base, models, None, spec.lam, base.dtype)
    [(_, out, _stats)] = list(CpuBackend(chunk=chunk).merge_many([job], ElementPlan.from_spec(spec)))
    return out


def test_zero_scale_returns_the_base_bitwise_including_negative_zero():
    base = torch.tensor([-0.0, 1.5, -2.0, 0.0])
    model = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = _run("task_arithmetic", base, [model], lam=0.0)
    assert torch.equal(out.view(torch.int32), base.view(torch.int32))


def test_trim_keeps_ties_at_the_threshold_and_zeroes_the_rest():
    # |tau| = 3, 1, 2, 2, 0, 2: density 0.5 -> k = 3, third largest = 2: all three 2s kept too.
    base = torch.zeros(6)
    model = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.0, 2.0])
    out = _run("ties", base, [model], density=0.5)
    assert out.tolist() == [3.0, 0.0, 2.0, -2.0, 0.0, 2.0]


def test_election_cancelling_sum_elects_plus_and_disjoint_mean():
    # Element 0: +2 and -2 cancel -> gamma = +1 -> mean of agreeing {+2} = 2.
    # Element 1: +1, -3 -> gamma = -1 -> -3.  Element 2: +1, +3 -> 2.  Element 3: 0, 0 -> 0.
    base = torch.zeros(4)
    a = torch.tensor([2.0, 1.0, 1.0, 0.0])
    b = torch.tensor([-2.0, -3.0, 3.0, 0.0])
    assert _run("ties", base, [a, b]).tolist() == [2.0, -3.0, 2.0, 0.0]


@pytest.mark.parametrize("method, kw", [
    ("ties", dict(density=0.3)), ("ties", dict(density=0.3, rescale=True)), ("dare_ties", dict(density=0.3, seed=5)),
    ("dare_linear", dict(density=0.3, seed=5, rescale="inverse")), ("task_arithmetic", {})])
@pytest.mark.parametrize("chunk", [5, 64, 1 << 18])
def test_matches_reference_for_any_chunking(method, kw, chunk):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(1000, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(1000, generator=g) * 2e-3).bfloat16() for _ in range(3)]
    kw = dict(kw, weights=[1.0, 0.5, 2.0])
    out = _run(method, base, models, chunk=chunk, **kw)
    ref = merge_state_dicts({"w": base}, [{"w": m} for m in models], method, **kw)["w"]
    verdict = compare(out, ref)
    assert verdict.ok, verdict.why
    assert verdict.n_different == 0   # same operations in the same order: bitwise equal


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_fused_norms_equal_the_separate_ones_bitwise(method):
    """α auto's norms pass reads each tensor once: both L1 norms, the same bits as two calls,
    and ‖Σ τ_i‖₁ checked against a float64 sum of the untrimmed task vectors."""
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(3000, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(3000, generator=g) * 2e-3).bfloat16() for _ in range(3)]
    params = dict(weights=(1.0, 0.5, 2.0)) if method == "task_arithmetic" else dict(weights=(1.0, 0.5, 2.0),
                                                                                     density=0.3)
    if method == "dare_ties":
        params["seed"] = 4
    plan = ElementPlan.from_spec(spec_from_params(method, 3, **params))
    backend = CpuBackend(chunk=1000)
    fused = backend.delta_norms(MergeJob("w", base, models, None, 1.0, torch.float32), plan)[:2]
    separate = (backend.task_vector_sum_l1(base, models),
                backend.delta_norms(MergeJob("w", base, models, None, 1.0, torch.float32), plan,
                                    with_task_sum=False)[1])
    assert fused == separate
    task_sum = sum(m.float() - base.float() for m in models).double().abs().sum().item()
    assert fused[0] == pytest.approx(task_sum, rel=1e-12) and 0 < fused[1] < 3 * task_sum


@pytest.mark.parametrize("compiled", [False, True])
def test_drop_masks_are_drawn_once_per_merge_and_give_the_same_bytes(monkeypatch, compiled):
    """dare_ties and della with L1 rescale: the merge reuses the keep masks its rescale
    statistics drew (no second draw, nor second ranking), with the same output as drawing them
    again (KEEP_BUDGET 0)."""
    import lines_fast.backends.cpu as cpu
    from lines_fast.backends.base import MergeJob
    from lines_fast.plan import ElementPlan
    from lines_fast.spec import make_spec

    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 300, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(40, 300, generator=g)).to(torch.bfloat16) for _ in range(3)]
    real, draws = cpu.dare_uniform, []

    def counted(*args, **kwargs):
        draws.append(1)
        return real(*args, **kwargs)

    import lines_fast.backends.cpu_fused as cpu_fused
    # Every draw: the statistics' and the compiled merge's redrawn masks (plan.keep_masks), the torch
    # path's and the DARE kernel call's own (dare_uniform in the backend).
    monkeypatch.setattr(cpu, "dare_uniform", counted)
    monkeypatch.setattr(cpu_fused, "dare_uniform", counted)
    keep_masks = ElementPlan.keep_masks
    monkeypatch.setattr(ElementPlan, "keep_masks", lambda *a, **k: (draws.append(1), keep_masks(*a, **k))[1])
    for method in ("dare_ties", "della"):
        plan = ElementPlan.from_spec(make_spec(method, 3, values={"density": 0.5}))
        job = MergeJob("model.layers.0.mlp.up_proj.weight", base, models, None, 1.0, torch.bfloat16)
        draws.clear()
        ((_, reused, _),) = list(CpuBackend(chunk=3000, compiled=compiled).merge_many([job], plan))
        assert len(draws) == 3 * 4, method   # the statistics' only: 3 models x 4 chunks of 3000
        draws.clear()
        monkeypatch.setattr(cpu, "KEEP_BUDGET", 0)
        ((_, redrawn, _),) = list(CpuBackend(chunk=3000, compiled=compiled).merge_many([job], plan))
        assert len(draws) == 2 * 3 * 4, method   # and the merge's again
        assert torch.equal(reused.view(torch.int16), redrawn.view(torch.int16)), method
        monkeypatch.setattr(cpu, "KEEP_BUDGET", 64 << 20)
