"""The CPU backend's compiled path (backends/cpu_fused.py, jit.merge_chunk / packed_histograms)
against its torch path, bit for bit: every registered method (the fused ones and those that
stay in torch), input dtypes, chunk and block edges, values at the thresholds, and Inf/NaN."""
from __future__ import annotations

import re

import pytest
import torch

from lines_fast import jit, methods
from lines_fast.backends import cpu_fused
from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.errors import NonFiniteInput
from lines_fast.gram import add_gram, new_gram
from lines_fast.spec import LinesSpec, make_spec
from lines_fast.plan import ElementPlan

pytestmark = pytest.mark.skipif(jit.kernels() is None, reason="numba is not installed")

N = 3 * jit.BLOCK + 517   # several blocks, a ragged last one


def _inputs(n_models: int, dtype=torch.bfloat16, n: int = N, seed: int = 0):
    """A base and models whose deltas sit on a coarse grid (equal magnitudes: ties at every
    threshold), with exact zeros, sign cancellations and a -0.0 in the base."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).to(dtype)
    base[7] = -0.0
    models = []
    for i in range(n_models):
        delta = torch.randint(-6, 7, (n,), generator=g).float() * 2.0 ** -9 * (i + 1)
        delta[torch.rand(n, generator=g) < 0.25] = 0.0
        models.append((base.float() + delta).to(dtype))
    if n_models > 1:   # element 11: the models' deltas cancel (an elected sign at a zero sum)
        models[1][11] = (base[11].float() - (models[0][11].float() - base[11].float())).to(dtype)
    return base, models


def _merge(compiled: bool, plan: ElementPlan, base, models, out_dtype=torch.float32, chunk=1000, scale=0.7,
           check_finite=True):
    job = MergeJob("model.layers.2.mlp.up_proj.weight", base, models, None, scale, out_dtype)
    backend = CpuBackend(chunk=chunk, compiled=compiled, check_finite=check_finite)
    [(_, out, _)] = list(backend.merge_many([job], plan))
    return out


def _spec(method: methods.Method, values: dict | None = None, lines=None):
    n = min(3, method.max_models or 3)
    values = {**{p.name: 0.4 for p in method.params if p.required}, **(values or {})}
    return make_spec(method.name, n, values=values, lines=lines), n


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("method", methods.names())
def test_every_method_merges_the_same_bits_compiled_or_not(method):
    definition = methods.get(method)
    spec, n = _spec(definition, {"density": 0.4} if definition.takes("density") else None)
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, seed=len(method))
    want = _merge(False, plan, base, models)
    got = _merge(True, plan, base, models)
    assert _bitwise_equal(got, want)


def _fused_plans():
    """Registered methods whose plan the compiled merge takes, with the options that switch its steps."""
    for method in methods.REGISTRY.values():
        spec, n = _spec(method)
        if not cpu_fused.takes(ElementPlan.from_spec(spec)):
            continue
        options = [{}]
        for param in method.params:
            if param.name == "density":
                options.append({"density": [0.3, 0.5, 1.0][:n]})
            elif param.kind == "bool" and param.affects_result:
                options.append({param.name: not param.default})
            elif param.name == "weight":
                options.append({"weight": [1.0, 0.5, 2.0][:n]})
                if method.takes("normalize"):   # mixed signs: a weighted sum only
                    options.append({"weight": [1.0, -0.5, 2.0][:n], "normalize": False})
            elif param.name == "consensus":   # the TALL mask, k of 3 and all 3
                options += [{"consensus": {"k": 2, "lambda": 0.4}}, {"consensus": {"k": 3, "lambda": 1.0}}]
            elif param.kind == "choice" and param.affects_result:
                options += [{param.name: c} for c in param.choices if c != param.default and c != "official"]
        for values in options:
            if cpu_fused.takes(ElementPlan.from_spec(_spec(method, values)[0])):
                yield method.name, values


FUSED_CASES = list(_fused_plans())


def test_the_compiled_merge_takes_the_common_methods():
    fused = {m for m, _ in FUSED_CASES}
    assert {"task_arithmetic", "ties", "linear", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
            "slerp", "nuslerp", "model_stock", "della", "della_linear"} <= fused
    assert {m for m, v in FUSED_CASES if "consensus" in v} == {"task_arithmetic", "ties"}


def _counting(monkeypatch, kernel: str) -> list:
    """Calls of the compiled `kernel` from now on (one item each)."""
    calls = []
    kernels = jit.kernels()
    monkeypatch.setattr(jit, "kernels", lambda: type(kernels)(**{**vars(kernels), kernel: _counted(getattr(kernels, kernel), calls)}))
    return calls


# bf16 for every case; fp32 (and fp16, below) with 3 models only: each (input dtypes, model count)
# is a kernel signature numba compiles in 10-20 s, and the kernel reads each dtype the same way
# whatever the count.
DTYPE_CASES = [(m, v, dtype) for m, v in FUSED_CASES for dtype in (torch.bfloat16, torch.float32)
               if dtype == torch.bfloat16 or _spec(methods.get(m))[1] == 3]


# chunk 1000: every chunk one block at s = 0 of the kernel, several chunks a tensor; chunk 5000:
# one chunk of 4 blocks over 2 threads (blocks at s > 0: draws, masks and sums at an offset).
@pytest.mark.parametrize("chunk", [1000, 5000])
@pytest.mark.parametrize("method, values, dtype", DTYPE_CASES, ids=lambda v: str(v))
def test_fused_plans_take_the_compiled_path_and_give_the_torch_bits(method, values, dtype, chunk, monkeypatch):
    spec, n = _spec(methods.get(method), values, LinesSpec(alpha=0.5, beta=1.0, outside="last"))
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, dtype, seed=3)
    want = _merge(False, plan, base, models, chunk=chunk)
    calls = _counting(monkeypatch, "merge_chunk")
    got = _merge(True, plan, base, models, chunk=chunk)
    assert calls, "the compiled merge was not used"
    assert _bitwise_equal(got, want)


@pytest.mark.parametrize("method, values, budget", [
    ("della", {"density": 0.5, "epsilon": 0.1}, 3 * 5 * 113),   # the masks of the first 5 chunks kept (113 bytes each)
    ("della", {"density": 0.5, "epsilon": 0.1, "rescale": False}, None),   # no statistics: no masks kept
    ("della_linear", {"density": 0.6, "epsilon": 0.2, "rescale": False}, None),
    ("della", {"density": [1.0, 0.3, 0.7], "epsilon": 0.1, "rescale": False}, None),   # density 1 keeps all
])
def test_della_chunks_without_kept_masks_are_drawn_again_and_merged_compiled(method, values, budget, monkeypatch):
    """DELLA merges compiled with the keep masks its rescale statistics kept; past the backend's
    mask budget, or without its rescale, each chunk's masks are drawn again (ranks per row, then
    u >= p) and merged compiled too: the torch path's bits either way."""
    from lines_fast.backends import cpu

    spec, n = _spec(methods.get(method), values)
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, n=64 * 300, seed=9)
    base, models = base.view(64, 300), [m.view(64, 300) for m in models]   # rows of 300: chunks of 900
    want = _merge(False, plan, base, models, chunk=1000)
    if budget is not None:
        monkeypatch.setattr(cpu, "KEEP_BUDGET", budget)
    monkeypatch.setattr(jit, "JIT_AFTER", 0)   # the masks drawn again by the compiled ranks' kernel too
    ranks = _counting(monkeypatch, "della_drop_p")
    calls = _counting(monkeypatch, "merge_chunk")
    got = _merge(True, plan, base, models, chunk=1000)
    assert len(calls) == -(-64 * 300 // 900) and all(calls) and _bitwise_equal(got, want)
    assert ranks and all(ranks)
    assert not _bitwise_equal(want, _merge(False, ElementPlan.from_spec(_spec(methods.get(method), {
        **values, "seed": 1})[0]), base, models, chunk=1000))   # the draws matter: a wrong mask would show


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_l1_rescale_statistics_compiled_are_the_torch_ones(method, monkeypatch):
    """The exact sums of |x_i| and of its kept part, and the packed keep masks, in one compiled
    pass (jit_kernels.add_abs_bins_kept): the same factors and the same mask bytes."""
    spec, n = _spec(methods.get(method), {"density": 0.45})
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, n=64 * 300, seed=10)
    job = MergeJob("model.layers.0.mlp.up_proj.weight", base.view(64, 300), [m.view(64, 300) for m in models],
                   None, 1.0, torch.bfloat16)
    found = []
    for compiled in (False, True):
        backend = CpuBackend(chunk=1000, compiled=compiled)
        calls = _counting(monkeypatch, "add_abs_bins_kept") if compiled else []
        with backend._keeping_masks():
            stats = backend.tensor_stats(job, plan)
            masks = {s: [m.clone() for m in slots] for s, slots in backend._kept.items()}
        found.append((stats.factors, masks, bool(calls)))
    (want, want_masks, _), (got, got_masks, ran) = found
    assert ran and got == want and all(f != 1.0 for f in got)
    assert got_masks.keys() == want_masks.keys() and len(got_masks) > 1
    assert all(torch.equal(a, b) for s in want_masks for a, b in zip(got_masks[s], want_masks[s]))


def _counted(kernel, calls):
    """One item per call: what merge_chunk returned (False: it declined the chunk), else True."""
    def run(*args):
        result = kernel(*args)
        calls.append(True if result is None else bool(result))
        return result
    return run


@pytest.mark.parametrize("chunk", [1, 1000, jit.BLOCK, 1 << 18])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ties_at_any_chunking_and_output_dtype(chunk, out_dtype):
    plan = ElementPlan.from_spec(make_spec("ties", 3, values={"density": 0.3, "weight": [1.0, 0.5, 2.0]}))
    base, models = _inputs(3, n=2 * jit.BLOCK + 3)
    assert _bitwise_equal(_merge(True, plan, base, models, out_dtype, chunk), _merge(False, plan, base, models, out_dtype, chunk))


def test_a_zero_sum_elects_plus_and_a_tie_at_the_threshold_is_kept_by_hand():
    # |x| = 3, 1, 2, 2, 0, 2 for one model: density 0.5 keeps k = 3, the third largest is 2, so all
    # 2s stay. Model 2 cancels element 0 (3 - 3): the sum is 0, gamma = +1, the mean of {3} is 3.
    plan = ElementPlan.from_spec(make_spec("ties", 2, values={"density": [0.5, 1.0]}))
    base = torch.zeros(6)
    a = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.0, 2.0])
    b = torch.tensor([-3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = _merge(True, plan, base, [a, b], scale=1.0)
    assert out.tolist() == [3.0, 0.0, 2.0, -2.0, 0.0, 2.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2, -1])   # model 0, model 2, the base
def test_a_nonfinite_input_is_named_as_the_torch_path_names_it(bad, where, monkeypatch):
    plan = ElementPlan.from_spec(make_spec("ties", 3, values={"density": 0.5}))
    base, models = _inputs(3)
    (base if where == -1 else models[where])[N - 5] = bad
    calls = _counting(monkeypatch, "merge_chunk")
    with pytest.raises(NonFiniteInput) as raised:
        _merge(True, plan, base, models)
    assert raised.value.model_index == where
    assert calls   # the kernel ran, found the value and gave the chunk to torch
    # --allow-nonfinite: the chunk goes through torch, to the torch path's values.
    want = _merge(False, plan, base, models, check_finite=False)
    assert _bitwise_equal(_merge(True, plan, base, models, check_finite=False), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 5, jit.BLOCK + 1, 3 * cpu_fused.HISTOGRAM_SPAN // 2 + 9])
def test_compiled_histograms_count_what_torch_counts(dtype, n, monkeypatch):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + torch.randn(n, generator=g) * 1e-2 * (torch.rand(n, generator=g) < 0.6)).to(dtype)
              for _ in range(3)]
    want = CpuBackend(compiled=False).magnitude_histograms(base, models)
    calls = _counting(monkeypatch, "packed_histograms")
    got = CpuBackend(compiled=True).magnitude_histograms(base, models)
    assert calls
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert int(got.sum()) == 3 * n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [5, jit.BLOCK + 1, 3 * cpu_fused.HISTOGRAM_SPAN // 2 + 9])
def test_compiled_refine_counts_the_low_bits_of_one_bucket(dtype, n, monkeypatch):
    """The refine pass (a threshold pass 1 did not settle): the low 16 bits of the |tau| in one
    bucket, compiled as in torch and as counted here from the bit patterns themselves."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtype)
    model = (base.float() + torch.randn(n, generator=g) * 1e-2).to(dtype)
    bits = (model.float() - base.float()).abs().view(torch.int32).long()
    bucket = int(torch.mode(bits >> 16).values)   # the fullest bucket: the test counts something
    want = torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    calls = _counting(monkeypatch, "bucket_histogram")
    got = CpuBackend(compiled=True).magnitude_histogram(base, model, bucket)
    assert calls
    assert got.dtype == torch.int64 and torch.equal(got, want) and int(got.sum()) > 0
    assert torch.equal(CpuBackend(compiled=False).magnitude_histogram(base, model, bucket), want)


# -- Gram statistics (slerp, nuslerp, model_stock): jit.gram_chunk ----------------------------

GROUPED = [m.name for m in methods.REGISTRY.values() if ElementPlan.from_spec(_spec(m)[0]).grouped]
SHAPE = (37, 300)   # rows straddle the chunks and the kernel's blocks


def _spans(chunk):
    return lambda numel, step=None: ((s, min(s + chunk, numel)) for s in range(0, numel, chunk))


def _exact_gram(plan, base, models, view):
    """float64 [groups, M, M]: each group's products (exact in float64) summed by math.fsum."""
    import math

    xs = [(m.float() - base.float()) if plan.deltas else m.float() for m in models]
    xs = [x.reshape(view.rows, view.cols).double() for x in xs]
    out = torch.zeros(view.groups, len(xs), len(xs), dtype=torch.float64)
    for a, xa in enumerate(xs):
        for b, xb in enumerate(xs):
            products = xa * xb
            for g in range(view.groups):
                group = products[g] if view.by_rows else products[:, g]
                out[g, a, b] = math.fsum(group.tolist())
    return out


def test_the_compiled_gram_by_hand():
    plan = ElementPlan.from_spec(make_spec("slerp", 2, values={"t": 0.5}))   # the models themselves
    job = MergeJob("w", None, [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, -6.0])], None, 1.0,
                   torch.float32)
    view = cpu_fused.group_view((3,), "tensor")
    got = cpu_fused.gram(jit.kernels(), job, plan, view, _spans(2))
    assert got.tolist() == [[[14.0, -4.0], [-4.0, 77.0]]]


@pytest.mark.parametrize("chunk", [1000, 1 << 18])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_by", ["tensor", "trailing", "leading", "columns"])
@pytest.mark.parametrize("method", GROUPED)
def test_the_compiled_gram_is_the_float64_sum_of_the_products(method, group_by, dtype, chunk):
    spec, n = _spec(methods.get(method))
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, dtype, n=SHAPE[0] * SHAPE[1], seed=4)
    base, models = base.view(SHAPE), [m.view(SHAPE) for m in models]
    job = MergeJob("w", base, models, None, 1.0, torch.float32)
    view = cpu_fused.group_view(SHAPE, group_by)
    exact = _exact_gram(plan, base, models, view)
    got = cpu_fused.gram(jit.kernels(), job, plan, view, _spans(chunk))
    assert got.shape == exact.shape == (view.groups, n, n)
    # float64 sums of at most 11100 exact products: within 11100 ulps of the sum of magnitudes.
    bound = 11100 * 2.0 ** -52 * _exact_gram(plan, base, [m.float().abs() for m in models], view).abs()
    assert bool(((got - exact).abs() <= bound).all()) and not torch.equal(exact, torch.zeros_like(exact))
    assert torch.equal(got, got.transpose(1, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:   # the same bits on one thread: the order depends on the chunking only
        assert torch.equal(cpu_fused.gram(jit.kernels(), job, plan, view, _spans(chunk)), got)
    finally:
        torch.set_num_threads(threads)


def test_the_gram_per_column_by_hand_whatever_the_chunking():
    """Columns of a [3, 2] task-vector pair: each column's sum in row order, chunks cutting rows."""
    plan = ElementPlan.from_spec(make_spec("nuslerp", 2, values={"nuslerp_flatten": False, "nuslerp_row_wise": True}))
    base = torch.zeros(3, 2)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    b = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]])
    job = MergeJob("w", base, [a, b], None, 1.0, torch.float32)
    view = cpu_fused.group_view((3, 2), plan.group_by)
    want = [[[35.0, 7.0], [7.0, 5.0]], [[56.0, 18.0], [18.0, 10.25]]]   # sum over rows, per column
    for chunk in (1, 3, 4, 6):
        assert cpu_fused.gram(jit.kernels(), job, plan, view, _spans(chunk)).tolist() == want
        torch_path = new_gram(view, 2)   # the torch path's (gram.add_gram), chunk by chunk
        for s, e in _spans(chunk)(6):
            add_gram(torch_path, [a.reshape(-1)[s:e], b.reshape(-1)[s:e]], s, view)
        assert torch_path.tolist() == want


GROUPINGS = [{}, {"filter_wise": True}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("shape, chunk, threads", [(SHAPE, 1000, 1), (SHAPE, 5000, 2), ((3, 5000), 4099, 2),
                                                   ((4, 6, 8), 50, 1), ((5000,), 1 << 18, 2)], ids=str)
@pytest.mark.parametrize("method, values", [(m, v) for m in GROUPED for v in GROUPINGS
                                            if all(methods.get(m).takes(k) for k in v)], ids=str)
def test_gram_methods_merge_to_the_torch_bits(method, values, shape, chunk, threads, monkeypatch):
    """The merge and its Gram statistic compiled whatever the groups (one weight per tensor, row or
    column), chunks that straddle rows and span several of the kernel's blocks and threads' shares,
    rows longer than a chunk, 3-D and 1-D tensors."""
    import math

    spec, n = _spec(methods.get(method), values)
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, seed=6, n=math.prod(shape))
    base, models = base.view(shape), [m.view(shape) for m in models]
    want = _merge(False, plan, base, models, chunk=chunk)
    merges, grams = _counting(monkeypatch, "merge_chunk"), _counting(monkeypatch, "gram_chunk")
    columns = _counting(monkeypatch, "gram_columns")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _merge(True, plan, base, models, chunk=chunk)
    finally:
        torch.set_num_threads(previous)
    view = cpu_fused.group_view(shape, plan.group_by)
    assert merges and all(merges) and (columns if plan.group_by == "columns" and view.groups > 1 else grams)
    assert _bitwise_equal(got, want)


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_a_nonfinite_rescale_factor_is_spread_as_the_torch_path_spreads_it(method):
    """--allow-nonfinite: an Inf input makes that model's L1 factor NaN; the kernel, which checks only
    its inputs, would drop the NaN contributions in the sign election, so such a tensor merges on
    the torch path (the reference's NaN there)."""
    spec, n = _spec(methods.get(method), {"density": 0.5})
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, n=64 * 300, seed=12)
    base, models = base.view(64, 300), [m.view(64, 300) for m in models]
    models[1][40, 7] = float("inf")
    want = _merge(False, plan, base, models, chunk=1000, check_finite=False)
    got = _merge(True, plan, base, models, chunk=1000, check_finite=False)
    assert int(torch.isnan(want).sum()) > 1000 and _bitwise_equal(got, want)


def test_inputs_the_kernels_cannot_read_stay_in_torch():
    base, models = _inputs(2)
    plan = ElementPlan.from_spec(make_spec("ties", 2, values={"density": 0.5}))
    mixed = [models[0], models[1].float()]   # the models go to the kernel as one tuple: one dtype
    assert cpu_fused.FusedMerge.of(jit.kernels(), MergeJob("w", base, mixed, None, 1.0, torch.float32), plan,
                                   None) is None
    assert cpu_fused.as_array(models[0].double()) is None
    assert _bitwise_equal(_merge(True, plan, base, mixed), _merge(False, plan, base, mixed))


def test_every_fp16_bit_pattern_widens_to_torchs_float32():
    import numba
    import numpy as np

    from lines_fast.jit_kernels import widen

    @numba.njit
    def widened(a, out):
        for j in range(a.shape[0]):
            out[j] = widen(a, j)

    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)   # subnormals, -0, Inf, NaN
    got = torch.empty(1 << 16, dtype=torch.float32)
    widened(cpu_fused.as_array(bits.view(torch.float16)), got.numpy())
    assert cpu_fused.as_array(bits.view(torch.float16)).dtype == np.int16   # bf16 is uint16: told apart
    assert torch.equal(got.view(torch.int32), bits.view(torch.float16).float().view(torch.int32))


@pytest.mark.parametrize("method, values", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.6}),
                                            ("task_arithmetic", {}), ("model_stock", {})], ids=str)
def test_fp16_checkpoints_merge_compiled_to_the_torch_bits(method, values, monkeypatch):
    spec, n = _spec(methods.get(method), values, LinesSpec(alpha=0.5, beta=1.0, outside="last"))
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, torch.float16, seed=8)
    models[0][3] = 1e-7   # an fp16 subnormal
    want = _merge(False, plan, base, models, out_dtype=torch.float16, chunk=5000)
    calls = _counting(monkeypatch, "merge_chunk")
    got = _merge(True, plan, base, models, out_dtype=torch.float16, chunk=5000)
    assert calls and _bitwise_equal(got, want)


# -- loading the kernels in the background (jit.prefetch) -----------------------------------

@pytest.fixture
def unloaded(monkeypatch):
    """jit's state as in a fresh process: nothing loaded, nothing prefetched."""
    import threading

    monkeypatch.setattr(jit, "_tried", False)
    monkeypatch.setattr(jit, "_kernels", None)
    monkeypatch.setattr(jit, "_loader", None)
    monkeypatch.setattr(jit, "_loaded", threading.Event())
    monkeypatch.setattr(jit, "_work_in_torch", 0)
    return monkeypatch


def test_prefetch_loads_in_the_background_while_the_merge_goes_on_in_torch(unloaded):
    import threading

    real, gate = jit._compile, threading.Event()
    unloaded.setattr(jit, "_compile", lambda: (gate.wait(10), real())[1])
    jit.prefetch(jit.JIT_AFTER - 1)
    assert jit._loader is None   # too little work: numba is not worth its load
    jit.prefetch(jit.JIT_AFTER)
    assert jit._loader is not None and jit._loader.is_alive()
    assert jit.compiled(jit.WAIT_WORK - 1) is None   # still loading: torch meanwhile
    opener = threading.Timer(0.3, gate.set)
    opener.start()
    assert jit.compiled(jit.WAIT_WORK) is not None   # so large a call waits for the load
    assert gate.is_set()   # it returned after the load, not before
    opener.join()
    assert jit.compiled(1) is not None   # loaded: used from now on, whatever the work


def test_once_work_loaded_the_kernels_every_later_call_gets_them(unloaded):
    assert jit.compiled(jit.JIT_AFTER // 2) is None
    assert jit.compiled(jit.JIT_AFTER // 2) is not None   # the work so far reached JIT_AFTER
    assert jit.compiled(1) is not None   # a light plan's merge after a Gram statistic that loaded them


def test_the_engine_tells_the_cpu_backend_its_work(tmp_path, unloaded):
    from lines_fast.engine import merge
    from helpers import write_safetensors

    seen = []
    unloaded.setattr(jit, "prefetch", seen.append)
    shapes = {"model.layers.0.mlp.up_proj.weight": (64, 32), "model.norm.weight": (32,)}
    for k, folder in enumerate(["base", "ft1", "ft2"]):
        g = torch.Generator().manual_seed(k)
        (tmp_path / folder).mkdir()
        write_safetensors(tmp_path / folder / "model.safetensors",
                          {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()})
    for method, share in [("ties", 1), ("task_arithmetic", cpu_fused.LIGHT_PLAN_SHARE)]:
        doc = {"merge_method": method, "base_model": str(tmp_path / "base"), "parameters": {"density": 0.5} if method == "ties" else {},
               "models": [{"model": str(tmp_path / "ft1")}, {"model": str(tmp_path / "ft2")}]}
        seen.clear()
        merge(doc, tmp_path / f"out-{method}", device="cpu", progress=False, log=lambda s: None)
        assert seen == [int((64 * 32 + 32) * 2 * share)]


@pytest.mark.parametrize("method, values", FUSED_CASES, ids=lambda v: str(v))
def test_lines_alpha_auto_norms_are_the_torch_norms(method, values, monkeypatch):
    """delta_norms (||sum tau_i||_1 and ||tau_m||_1 for LiNeS alpha auto) through merge_chunk's
    STEP_TAU / STEP_TASK_SUM: the same exact sums as the torch path's."""
    spec, n = _spec(methods.get(method), values, LinesSpec(alpha="auto", beta=0.5))   # LiNeS reads a base
    plan = ElementPlan.from_spec(spec)
    base, models = _inputs(n, seed=5)
    job = MergeJob("model.layers.1.self_attn.q_proj.weight", base, models, None, 1.0, torch.bfloat16)
    want = CpuBackend(chunk=5000, compiled=False).delta_norms(job, plan)
    calls = _counting(monkeypatch, "merge_chunk")
    got = CpuBackend(chunk=5000, compiled=True).delta_norms(job, plan)
    assert calls and got[:2] == want[:2] and got[0] > 0 and got[1] >= 0
    assert CpuBackend(chunk=5000, compiled=True).delta_norms(job, plan, with_task_sum=False)[:2] == (0.0, want[1])


def test_a_kernel_compile_is_announced_with_its_time_and_a_compiled_one_is_not():
    import numba
    from types import SimpleNamespace

    from numba.core import event

    @numba.njit   # not cached: this test compiles it
    def doubled(x):
        return 2 * x

    listener = jit._compile_listener(SimpleNamespace(doubled=doubled))
    event.register("numba:compile", listener)
    said = []
    try:
        with jit.compile_notices(said.append):
            assert doubled(21) == 42
            assert doubled(4) == 8   # compiled for ints already: nothing to announce
        assert doubled(2.5) == 5.0   # a new signature, outside compile_notices: not announced
    finally:
        event.unregister("numba:compile", listener)
    assert len(said) == 2, said
    assert said[0].startswith("compiling CPU kernel doubled for these input types (first use on this machine")
    assert re.fullmatch(r"compiled doubled in \d+\.\d s", said[1]), said[1]

    @numba.njit
    def broken(x):
        return x.no_such_attribute

    listener = jit._compile_listener(SimpleNamespace(broken=broken))
    event.register("numba:compile", listener)
    said.clear()
    try:
        with jit.compile_notices(said.append), pytest.raises(numba.core.errors.TypingError):
            broken(1)
    finally:
        event.unregister("numba:compile", listener)
    assert len(said) == 2 and re.fullmatch(r"failed to compile broken in \d+\.\d s", said[1]), said


def test_a_merge_announces_compiles_through_its_log(tmp_path, monkeypatch):
    from lines_fast.engine import Engine, merge
    from helpers import write_safetensors

    for folder in ["base", "ft1"]:
        (tmp_path / folder).mkdir()
        write_safetensors(tmp_path / folder / "model.safetensors", {"model.norm.weight": torch.randn(8).bfloat16()})
    seen, real = [], Engine._run_locked
    monkeypatch.setattr(Engine, "_run_locked", lambda self, started: (seen.append(jit._notify), real(self, started))[1])
    logged = []
    merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "ft1")}]}, tmp_path / "out", device="cpu", progress=False,
          log=logged.append)
    assert seen == [logged.append] and jit._notify is None   # the engine's log while it runs, and only then
