"""The Triton kernels (kernels/merge.py, kernels/select.py) against lines_fast.reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors; with one they run
compiled on it (the same cases), plus GPU-only cases (a tensor above 2^31 elements).
TRITON_INTERPRET must be set before lines_fast.kernels is imported: tests/conftest.py does
it for the whole session.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from lines_fast import reference as ref  # noqa: E402
from lines_fast import rng  # noqa: E402
from lines_fast.backends.triton_backend import import_kernels  # noqa: E402
from lines_fast.layers import lines_scales  # noqa: E402
from lines_fast.selection import BINS, threshold_from_histograms  # noqa: E402
from lines_fast.methods import REGISTRY, Inputs, Rescale, Sparsify  # noqa: E402
from lines_fast.plan import ElementPlan, TensorStats  # noqa: E402
from lines_fast.spec import LinesSpec, MethodSpec, kept_count, make_spec  # noqa: E402

kmerge, kselect = import_kernels()
INTERPRET = kmerge._interpreted(kmerge._fused_merge_kernel)
DEVICE = "cpu" if INTERPRET else "cuda"
# Small blocks in the interpreter so every case runs several programs and a ragged tail.
BLOCK = 256 if INTERPRET else None

pytestmark = [
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                       reason="compiled Triton kernels need a GPU; set TRITON_INTERPRET=1 to interpret"),
]
if not INTERPRET:
    pytestmark.append(pytest.mark.gpu)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NAME = "model.layers.3.mlp.up_proj.weight"
# The methods whose steps the kernels have (tests/test_methods.py pins the gaps: DELLA).
METHODS = tuple(name for name, m in REGISTRY.items() if m.sparsify in kmerge.SUPPORTED["sparsify"])


# ---------------------------------------------------------------------------------------
# Tolerances: docs/methods.md, "Tolerances"
# ---------------------------------------------------------------------------------------

def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns mapped to integers that order like the values (so ulp distance = difference)."""
    bits = x.view({F32: torch.int32, BF16: torch.int16, F16: torch.int16}[x.dtype]).to(torch.int64)
    sign_bit = 1 << (x.element_size() * 8 - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_tolerance(fast: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within 4 ulp of the reference, or 1e-7 * max|theta| near 0.
    bf16/fp16: at most 1 ulp of the output dtype, on at most 1e-4 of the elements."""
    fast, expected = fast.cpu().reshape(-1), expected.cpu().reshape(-1)
    assert fast.dtype == expected.dtype and fast.shape == expected.shape
    assert not torch.isnan(fast).any()
    ulps = (_ordered(fast) - _ordered(expected)).abs()
    if fast.dtype == F32:
        near_zero = (fast.double() - expected.double()).abs() <= 1e-7 * expected.double().abs().max()
        bad = (ulps > 4) & ~near_zero
        assert not bad.any(), f"{int(bad.sum())} float32 values beyond 4 ulp, e.g. {fast[bad][:4]} vs {expected[bad][:4]}"
    else:
        assert int(ulps.max()) <= 1 if ulps.numel() else True, f"max ulp distance {int(ulps.max())}"
        off = int((ulps > 0).sum())
        assert off <= 1e-4 * fast.numel(), f"{off} of {fast.numel()} elements differ by 1 ulp"


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------

def make_inputs(n: int, n_models: int, base_dtype, model_dtypes, seed: int, zero_frac: float = 0.1):
    """A base and fine-tunes whose deltas are small, with exact zeros and (in bf16) many ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(base_dtype)
    models = []
    for i, dtype in enumerate(model_dtypes[:n_models]):
        delta = 0.02 * torch.randn(n, generator=g) * (1 + i)
        delta[torch.rand(n, generator=g) < zero_frac] = 0.0
        model = (base.float() + delta).to(dtype)
        model[torch.rand(n, generator=g) < zero_frac] = base[: 1].to(dtype)  # some equal across models
        models.append(model)
    return base, models


def spec_for(method: str, n_models: int, *, weights=None, density=0.3, normalize=None, seed=0, lam=None,
             rescale=None) -> MethodSpec:
    """The method's spec with these values where it takes them (the registry says which)."""
    given = {"weight": list(weights) if weights else None, "density": density, "normalize": normalize,
             "seed": seed, "lambda": lam, "rescale": rescale}
    definition = REGISTRY[method]
    values = {k: v for k, v in given.items() if v is not None and definition.takes(k)}
    values.update({p.name: 0.4 for p in definition.params if p.required})   # slerp's t
    return make_spec(method, n_models, values=values)


def model_count(method: str, wanted: int) -> int:
    """`wanted` inputs, within what the method merges."""
    definition = REGISTRY[method]
    return max(definition.min_models, min(wanted, definition.max_models or wanted))


def method_inputs(method: str, base, models):
    """The kernel's inputs: the base first where the method interpolates from it (slerp)."""
    return [base, *models[:-1]] if REGISTRY[method].inputs is Inputs.BASE_AND_MODELS else models


def trims(spec: MethodSpec) -> bool:
    return spec.definition.sparsify in (Sparsify.MAGNITUDE, Sparsify.BAND)


def reference_merge(base, models, spec: MethodSpec, scale: float, out_dtype, thresholds=None):
    """The reference's float32 merged tensor for one tensor called NAME, cast to out_dtype."""
    base_dict = None if base is None else {NAME: base}
    tau_m = ref.merged_task_vector(base_dict, [{NAME: m} for m in models], spec)[NAME]
    if base is None:
        return tau_m.to(out_dtype)
    return ref.apply_task_vector({NAME: base}, {NAME: tau_m}, scale)[NAME].to(out_dtype)


def ref_thresholds(base, models, densities):
    return tuple(ref.trim_thresholds({NAME: m.float() - base.float()}, d, "tensor")[NAME]
                 for m, d in zip(models, densities))


def ref_stats(base, models, spec: MethodSpec, thresholds=None, name=NAME) -> TensorStats:
    """The per-tensor statistics the plan needs, from the reference's building blocks."""
    plan = ElementPlan.from_spec(spec)
    ceilings = None
    if plan.band:
        bands = [ref.band_thresholds(m.float() - base.float(), d, g)
                 for m, d, g in zip(models, spec.densities, spec.gammas)]
        thresholds, ceilings = tuple(b[0] for b in bands), tuple(b[1] for b in bands)
    elif plan.trims and thresholds is None:
        thresholds = ref_thresholds(base, models, spec.densities)
    group_weights = None
    if plan.grouped:   # the reference's own per-group weights (its formulas, not gram.py's)
        xs = [m.float() - base.float() if plan.deltas else m.float() for m in models]
        group_weights = torch.stack([c.float() for c in ref.ANGLE_WEIGHTS[plan.coefficients](xs, spec)])
    stats = TensorStats(thresholds if plan.trims else None, None, ceilings, group_weights)
    if plan.rescale is Rescale.L1:
        factors = []
        for i, m in enumerate(models):
            tau = m.float() - base.float()
            row = plan.rank_row_len(tau.shape, name) if plan.ranked else None   # DELLA ranks whole rows
            keep = plan.keep_masks(tau.reshape(-1), i, stats, name, 0, row).view(tau.shape)
            factors.append(ref.l1_rescale_factor(tau, keep))
        stats = TensorStats(stats.thresholds, tuple(factors), ceilings)
    return stats


def dev(t):
    return None if t is None else t.to(DEVICE)


def run_merge(base, models, spec, *, scale, out_dtype, thresholds=None, name=NAME, elem_offset=0, flags=None):
    grouped = ElementPlan.from_spec(spec).grouped
    stats = ref_stats(base, models, spec, thresholds, name) if base is not None or grouped else None
    out = kmerge.fused_merge(dev(base), [dev(m) for m in models], ElementPlan.from_spec(spec), name=name,
                             stats=stats, scale=scale, out_dtype=out_dtype, elem_offset=elem_offset, block=BLOCK,
                             flags=flags)
    return out.cpu()


# ---------------------------------------------------------------------------------------
# Every method, dtype and model count against the reference
# ---------------------------------------------------------------------------------------

DTYPE_CASES = [
    # (base dtype, model dtypes, out dtype)
    (F32, [F32] * 4, F32),
    (BF16, [BF16] * 4, BF16),
    (F16, [F16] * 4, F16),
    (BF16, [F32, BF16, F16, BF16], BF16),   # mixed models: staged as float32
    (F16, [BF16] * 4, F32),                 # base and models differ
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=lambda d: f"{d[0]}-{d[1][1]}-{d[2]}".replace("torch.", ""))
def test_methods_match_reference(method, dtypes):
    base_dtype, model_dtypes, out_dtype = dtypes
    n_models = model_count(method, 3)
    base, models = make_inputs(1999, n_models, base_dtype, model_dtypes, seed=hash(method) % 1000)
    models = method_inputs(method, base, models)
    weights = [1.0, 0.3, 2.5][:n_models]
    spec = spec_for(method, n_models, weights=weights, density=0.35, seed=1234)
    thresholds = ref_thresholds(base, models, spec.densities) if trims(spec) else None
    scale = 0.7
    use_base = spec.uses_base
    got = run_merge(base if use_base else None, models, spec, scale=scale, out_dtype=out_dtype, thresholds=thresholds)
    want = reference_merge(base if use_base else None, models, spec, scale, out_dtype)
    assert_within_tolerance(got, want)


@pytest.mark.parametrize("n_models", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_model_counts(method, n_models):
    base, models = make_inputs(1000, n_models, BF16, [BF16] * 4, seed=n_models)
    spec = spec_for(method, n_models, weights=[1.0 + 0.25 * i for i in range(n_models)],
                    density=[0.2 + 0.2 * i for i in range(n_models)], seed=7)
    thresholds = ref_thresholds(base, models, spec.densities) if trims(spec) else None
    got = run_merge(base, models, spec, scale=1.0, out_dtype=BF16, thresholds=thresholds)
    assert_within_tolerance(got, reference_merge(base, models, spec, 1.0, BF16))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_densities(method, density):
    base, models = make_inputs(777, 2, F32, [F32, F32], seed=int(density * 100))
    spec = spec_for(method, 2, density=density, seed=99)
    thresholds = ref_thresholds(base, models, spec.densities) if trims(spec) else None
    got = run_merge(base, models, spec, scale=1.0, out_dtype=F32, thresholds=thresholds)
    assert_within_tolerance(got, reference_merge(base, models, spec, 1.0, F32))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_without_normalize(method):
    base, models = make_inputs(900, 3, BF16, [BF16] * 3, seed=5)
    spec = spec_for(method, 3, weights=[0.5, 1.0, 1.5], normalize=False, seed=3)
    thresholds = ref_thresholds(base, models, spec.densities) if trims(spec) else None
    got = run_merge(base, models, spec, scale=1.3, out_dtype=F32, thresholds=thresholds)
    assert_within_tolerance(got, reference_merge(base, models, spec, 1.3, F32))


def test_linear_soup_without_normalize_and_with_base():
    base, models = make_inputs(600, 3, F32, [BF16] * 3, seed=8)
    soup = spec_for("linear", 3, weights=[0.2, 0.3, 0.5], normalize=False)
    got = run_merge(None, models, soup, scale=1.0, out_dtype=BF16)
    assert_within_tolerance(got, reference_merge(None, models, soup, 1.0, BF16))
    # linear with a base (the LiNeS form): theta0 + scale * (soup - theta0)
    lines = make_spec("linear", 3, values={"weight": [0.2, 0.3, 0.5]}, lines=LinesSpec(alpha=0.5, beta=0.5))
    got = run_merge(base, models, lines, scale=0.75, out_dtype=F32)
    assert_within_tolerance(got, reference_merge(base, models, lines, 0.75, F32))


def test_ties_at_the_threshold_and_exact_zeros():
    """Many equal magnitudes at the threshold: all are kept; zeros stay zero."""
    base = torch.zeros(1000)
    values = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 0.25])
    g = torch.Generator().manual_seed(0)
    models = [values[torch.randint(0, 6, (1000,), generator=g)] for _ in range(3)]
    spec = spec_for("ties", 3, density=0.4)
    thresholds = ref_thresholds(base, models, spec.densities)
    got = run_merge(base, models, spec, scale=1.0, out_dtype=F32, thresholds=thresholds)
    assert torch.equal(got, reference_merge(base, models, spec, 1.0, F32))


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_task_vectors(method):
    base = torch.randn(513).to(BF16)
    base[:7] = -0.0
    n_models = model_count(method, 2)
    models = [base.clone() for _ in range(n_models)]
    spec = spec_for(method, n_models)
    thresholds = ref_thresholds(base, models, spec.densities) if trims(spec) else None
    use_base = spec.uses_base
    got = run_merge(base if use_base else None, models, spec, scale=1.0, out_dtype=BF16, thresholds=thresholds)
    want = reference_merge(base if use_base else None, models, spec, 1.0, BF16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_keep_nothing_threshold_and_zero_scale():
    base, models = make_inputs(500, 2, BF16, [BF16] * 2, seed=2)
    base[:5] = -0.0
    spec = spec_for("ties", 2, density=0.001)  # floor(0.5) = 0, but at least one is kept: k = 1
    thresholds = ref_thresholds(base, models, spec.densities)
    assert thresholds == tuple(float((m.float() - base.float()).abs().max()) for m in models)
    got = run_merge(base, models, spec, scale=1.0, out_dtype=BF16, thresholds=thresholds)
    want = reference_merge(base, models, spec, 1.0, BF16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # An infinite threshold (an empty scope) keeps nothing: theta0 + 0 (so -0.0 becomes +0.0).
    got = run_merge(base, models, spec, scale=1.0, out_dtype=BF16, thresholds=(math.inf, math.inf))
    assert torch.equal(got.view(torch.int16), (base.float() + 0.0).to(BF16).view(torch.int16))
    wise = spec_for("wise_ft", 1)
    got = run_merge(base, models[:1], wise, scale=0.0, out_dtype=BF16)  # a = 0: the base bitwise, -0.0 too
    assert torch.equal(got.view(torch.int16), base.view(torch.int16))


def test_lines_scales_per_tensor():
    """LiNeS: the per-tensor scale replaces lambda; the whole state dict against merge_state_dicts."""
    names = ["embed.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "norm.weight"]
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(300, generator=g).to(BF16) for n in names}
    models = [{n: (t.float() + 0.05 * torch.randn(300, generator=g)).to(BF16) for n, t in base.items()}
              for _ in range(2)]
    lines = LinesSpec(alpha=0.4, beta=0.9)
    want = ref.merge_state_dicts(base, models, "ties", density=0.5, lines=lines)
    scales = lines_scales(names, 0.4, 0.9)
    spec = spec_for("ties", 2, density=0.5)
    for name in names:
        thresholds = tuple(ref.trim_thresholds({name: m[name].float() - base[name].float()}, 0.5, "tensor")[name]
                           for m in models)
        got = kmerge.fused_merge(dev(base[name]), [dev(m[name]) for m in models], ElementPlan.from_spec(spec),
                                 name=name, stats=TensorStats(thresholds), scale=scales[name], out_dtype=BF16,
                                 block=BLOCK).cpu()
        assert_within_tolerance(got, want[name])


def test_cancelling_election_sum_keeps_plus_sign():
    """0.3 * x + 0.3 * -x is exactly 0 in float32, so gamma = +1; a fused multiply-add would
    leave the rounding error of 0.3 * x and could elect -1. Also checks signs directly."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(1024, generator=g) + 0.1
    base = torch.zeros(1024)
    models = [x, -x, 0.5 * x]
    spec = spec_for("ties", 3, weights=[0.3, 0.3, 0.0], density=1.0, normalize=False)
    thresholds = ref_thresholds(base, models, spec.densities)
    got = run_merge(base, models, spec, scale=1.0, out_dtype=F32, thresholds=thresholds)
    want = reference_merge(base, models, spec, 1.0, F32)
    assert torch.equal(got, want)
    gamma = ref.elect_sign([ref.trim(m, t) for m, t in zip(models, thresholds)], list(spec.weights))
    nonzero = got != 0
    assert torch.equal(torch.sign(got[nonzero]), gamma[nonzero])
    assert (gamma == 1).all()


# ---------------------------------------------------------------------------------------
# DARE masks: exactly rng.dare_uniform's, for any chunking
# ---------------------------------------------------------------------------------------

def _name_with_large_stream_id() -> str:
    for k in range(1000):
        name = f"model.layers.{k}.self_attn.q_proj.weight"
        if rng.tensor_stream_id(name) >= 1 << 31:
            return name
    raise AssertionError("no name with a stream id >= 2^31")


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 40) + 17])
def test_dare_masks_equal_the_reference(seed):
    """One model at a time carries tau = 1 (others 0), so the output is its mask / divisor."""
    n, density, n_models = 1500, 0.37, 3
    name = _name_with_large_stream_id()
    p, divisor = rng.dare_constants(density)
    spec = spec_for("dare_linear", n_models, density=density, seed=seed, rescale="inverse")
    base = torch.zeros(n)
    for i in range(n_models):
        models = [torch.full((n,), 1.0 if j == i else 0.0) for j in range(n_models)]
        got = run_merge(base, models, spec, scale=1.0, out_dtype=F32, name=name)
        want_kept = rng.dare_uniform(seed, i, name, n) >= p
        assert torch.equal(got != 0, want_kept), f"model {i}"
        assert torch.equal(got[want_kept], torch.full((int(want_kept.sum()),), 1.0) / torch.tensor(divisor))


@pytest.mark.parametrize("offset", [1000, (1 << 32) + 5])
def test_dare_chunked_launch_uses_the_global_index(offset):
    """A launch over a chunk starting at element `offset` draws the whole tensor's masks there."""
    n, density = 700, 0.5
    p, _ = rng.dare_constants(density)
    spec = spec_for("dare_ties", 2, density=density, seed=42, rescale="inverse")
    base = torch.zeros(n)
    models = [torch.ones(n), torch.zeros(n)]
    got = run_merge(base, models, spec, scale=1.0, out_dtype=F32, elem_offset=offset)
    assert torch.equal(got != 0, rng.dare_uniform(42, 0, NAME, n, start=offset) >= p)
    # and the full merge of a split tensor equals the merge of the whole
    base, models = make_inputs(1200, 2, BF16, [BF16] * 2, seed=4)
    whole = run_merge(base, models, spec, scale=1.0, out_dtype=BF16)
    parts = [run_merge(base[a:b], [m[a:b] for m in models], spec, scale=1.0, out_dtype=BF16, elem_offset=a)
             for a, b in [(0, 500), (500, 1111), (1111, 1200)]]
    assert torch.equal(torch.cat(parts).view(torch.int16), whole.view(torch.int16))


def test_ragged_sizes_split_into_a_vectorizable_launch_and_a_tail():
    """n % 16 != 0 would make every load scalar: the largest multiple of the block goes first."""
    assert kmerge.vector_friendly_spans(4096, 1024) == [(0, 4096)]
    assert kmerge.vector_friendly_spans(4112, 1024) == [(0, 4112)]        # a multiple of 16: one launch
    assert kmerge.vector_friendly_spans(4100, 1024) == [(0, 4096), (4096, 4)]
    assert kmerge.vector_friendly_spans(1000, 1024) == [(0, 1000)]         # smaller than a block
    assert kmerge.vector_friendly_spans(0, 1024) == []
    # Both launches write their own L1 partials: program 16 of 17 is the tail's only one.
    base, models = make_inputs(4100, 2, BF16, [BF16] * 2, seed=9)
    plan = ElementPlan.task_vector_sum(2)
    partials = torch.full((17,), -1.0, dtype=torch.float64, device=DEVICE)
    kmerge.launch_merge(None, dev(base), kmerge.stage_models([dev(m) for m in models]), plan.table(TensorStats(), DEVICE),
                        plan, n=4100, partials=partials, block=256)
    tau_sum = sum(m.float() - base.float() for m in models).abs().double()
    want = torch.stack([tau_sum[i * 256:(i + 1) * 256].sum() for i in range(17)])
    assert torch.allclose(partials.cpu(), want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Conversions: bf16 widening and round-to-nearest-even
# ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf, as torch
def test_bf16_widening_and_rounding_are_exact():
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    every_bf16 = bits.view(BF16)
    every_bf16 = every_bf16[torch.isfinite(every_bf16)]
    spec = spec_for("task_arithmetic", 1)
    zero32 = torch.zeros(every_bf16.numel())
    widened = run_merge(zero32, [every_bf16], spec, scale=1.0, out_dtype=F32)
    want = reference_merge(zero32, [every_bf16], spec, 1.0, F32)  # 0 + 1 * (x - 0): x, but -0.0 -> +0.0
    assert torch.equal(widened.view(torch.int32), want.view(torch.int32))
    # float32 values at and around bf16 rounding boundaries (ties to even), subnormals, -0.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-130, 100, (4000,), generator=g).float())
    halfway = (x.view(torch.int32) & ~0xFFFF) | 0x8000
    x = torch.cat([x, halfway.view(F32), torch.tensor([-0.0, 0.0, 3.0e38, -3.0e38, 1e-45])])
    zero32 = torch.zeros(x.numel())
    for dtype in (BF16, F16):
        out = run_merge(zero32, [x], spec, scale=1.0, out_dtype=dtype)
        want = reference_merge(zero32, [x], spec, 1.0, dtype)  # torch's cast of the float32 result
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)), dtype


def test_nonfinite_inputs_are_flagged():
    base, models = make_inputs(600, 3, BF16, [BF16] * 3, seed=6)
    flags = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    run_merge(base, models, spec_for("task_arithmetic", 3), scale=1.0, out_dtype=BF16, flags=flags)
    assert int(flags.item()) == 0
    models[1][599] = float("inf")
    base[3] = float("nan")
    run_merge(base, models, spec_for("task_arithmetic", 3), scale=1.0, out_dtype=BF16, flags=flags)
    assert int(flags.item()) == 0b101  # bit 0: the base, bit 2: model 1 (in different blocks)
    # In one block only one element's mask is reported: a nonzero subset of the true inputs.
    base[3], models[1][599] = 1.0, 1.0
    base[0], models[0][1] = float("inf"), float("nan")
    flags.zero_()
    run_merge(base, models, spec_for("task_arithmetic", 3), scale=1.0, out_dtype=BF16, flags=flags)
    assert int(flags.item()) in (0b01, 0b10, 0b11)


# ---------------------------------------------------------------------------------------
# Selection histograms and thresholds
# ---------------------------------------------------------------------------------------

def _hist(base, model, bucket=None):
    return kselect.magnitude_histogram(dev(base), dev(model), bucket, block=BLOCK).cpu()


def packed_counts(bits: torch.Tensor) -> torch.Tensor:
    """The packed layout, written independently: bucket, plus 32768 where the low bits are not 0."""
    nonzero_low = ((bits & 0xFFFF) != 0).to(torch.int32)
    return torch.bincount((bits >> 16) + 32768 * nonzero_low, minlength=BINS)


def test_packed_histogram_by_hand():
    base = torch.zeros(5)
    model = torch.tensor([1.0, 1.0000001192092896, 0.0, -2.0, 0.5])  # 0x3F800000, 0x3F800001, 0, 0x40000000, 0x3F000000
    hist = _hist(base, model)
    want = torch.zeros(BINS, dtype=torch.int64)
    want[[0x3F80, 0x3F80 | 0x8000, 0, 0x4000, 0x3F00]] = 1
    assert torch.equal(hist, want)
    assert torch.equal(_hist(base, model, 0x3F80)[:2], torch.tensor([1, 1]))  # low bits 0 and 1


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_histograms_count_bit_patterns(dtype):
    base, (model,) = make_inputs(3001, 1, dtype, [dtype], seed=10, zero_frac=0.3)
    bits = (model.float() - base.float()).abs().view(torch.int32)
    hist = _hist(base, model)
    assert hist.dtype == torch.int64 and hist.shape == (BINS,)
    assert torch.equal(hist, packed_counts(bits))
    bucket = int((bits >> 16)[bits != 0][0])
    refined = _hist(base, model, bucket)
    assert torch.equal(refined, torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=BINS))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_one_launch_histograms_every_model(dtype):
    """Pass 1 reads the base once for all N models: one row of counts per staged model."""
    n = 1500  # staged rows padded to a stride of 1504, as the backend lays them out
    base, models = make_inputs(n, 3, dtype, [dtype] * 3, seed=31, zero_frac=0.2)
    staged = torch.zeros(3, 1504, dtype=dtype, device=DEVICE)
    for i, m in enumerate(models):
        staged[i, :n] = dev(m)
    hist32 = torch.zeros(3, BINS, dtype=torch.int32, device=DEVICE)
    kselect.launch_magnitude_histogram(hist32, dev(base), staged[:, :n], n=n, block=BLOCK)
    for i, m in enumerate(models):
        bits = (m.float() - base.float()).abs().view(torch.int32)
        assert torch.equal(hist32[i].cpu().to(torch.int64), packed_counts(bits)), i


def _bench_like(n, n_models, seed):
    """bf16 deltas of a few exact values (multiples of the base's ulp): a handful of very hot bins."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(BF16)
    models = []
    for _ in range(n_models):
        delta = 0.01 * torch.randn(n, generator=g)
        delta[torch.rand(n, generator=g) < 0.05] = 0
        models.append((base.float() + delta).to(BF16))
    return base, models


def _staged_histograms(base, models, **kw):
    n = base.numel()
    hist32 = torch.zeros(len(models), BINS, dtype=torch.int32, device=DEVICE)
    staged = kmerge.stage_models([dev(m) for m in models])
    kselect.launch_magnitude_histogram(hist32, dev(base), staged, n=n, block=kw.pop("block", BLOCK), **kw)
    return hist32.cpu().to(torch.int64)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("table", ["lowest", "random", "sampled"])
def test_histogram_is_exact_whichever_bins_are_private(table, iters):
    """Hot bins are counted per program, the rest by global atomics: every element exactly once."""
    base, models = _bench_like(5000, 3, seed=41)
    if table == "lowest":
        hot = kselect.HotBins.lowest(DEVICE)
    elif table == "random":
        bins = torch.randperm(BINS, generator=torch.Generator().manual_seed(iters))[:32]  # 32 slots, not 64
        hot = kselect.HotBins.of(bins.to(DEVICE))
    else:
        staged = kmerge.stage_models([dev(m) for m in models])
        hot = kselect.sample_hot_bins(dev(base), staged, n=base.numel(), block=BLOCK)
    hist = _staged_histograms(base, models, iters=iters, hot=hot)
    for i, m in enumerate(models):
        bits = (m.float() - base.float()).abs().view(torch.int32)
        assert torch.equal(hist[i], packed_counts(bits)), i


def test_sampling_privatizes_the_hot_bins(monkeypatch):
    base, models = _bench_like(kselect.SAMPLE_BLOCKS * BLOCK * 4, 2, seed=42)
    counts = sum(packed_counts((m.float() - base.float()).abs().view(torch.int32)) for m in models)
    staged = kmerge.stage_models([dev(m) for m in models])
    hot = kselect.sample_hot_bins(dev(base), staged, n=base.numel(), block=BLOCK)
    private = set(hot.bin_of_slot.cpu().tolist())
    assert int(hot.bin_of_slot[0]) == 0 and len(private) == kselect.HOT_SLOTS
    top = counts.topk(6).indices.tolist()  # zeros and the few 1-ulp bins hold most elements
    assert set(top) <= private, (top, sorted(private)[:10])
    assert counts[list(private)].sum() > 0.9 * counts.sum()
    slot_of_bin = hot.slot_of_bin.cpu().long()
    assert torch.equal(slot_of_bin[hot.bin_of_slot.cpu().long()], torch.arange(kselect.HOT_SLOTS))
    assert int((slot_of_bin >= 0).sum()) == kselect.HOT_SLOTS
    # A pass 1 big enough to sample by itself still counts exactly.
    monkeypatch.setattr(kselect, "SAMPLE_MIN_ELEMENTS", 0)
    hist = _staged_histograms(base, models)
    for i, m in enumerate(models):
        assert torch.equal(hist[i], packed_counts((m.float() - base.float()).abs().view(torch.int32)))


def test_bf16_deltas_have_low_bits_zero():
    base = torch.tensor([1.0, 2.0, -0.5] * 100).to(BF16)
    model = (base.float() + 0.125).to(BF16)  # exact small deltas: low 16 bits all zero
    assert int(_hist(base, model)[0x8000:].sum()) == 0
    model[0] = 384.0  # 384 - 1 = 383 needs 9 significant bits: not a bf16, low bits nonzero
    hist = _hist(base, model)
    assert int(hist[0x8000:].sum()) == 1 and int(hist[0x43BF | 0x8000]) == 1  # 383.0 = 0x43BF8000


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 1.0])
def test_tensor_scope_thresholds_equal_the_reference(dtype, density):
    base, models = make_inputs(2500, 2, dtype, [dtype] * 2, seed=int(density * 1000), zero_frac=0.2)
    for model in models:
        tau = model.float() - base.float()
        want = ref.trim_thresholds({NAME: tau}, density, "tensor")[NAME]
        k = kept_count(density, tau.numel())
        got = threshold_from_histograms(_hist(base, model), k, lambda b: _hist(base, model, b))
        assert got == want


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_resident_thresholds_on_staged_models(dtype):
    """The backend's one-upload selection: pass 1 for all models, pass 2 only where needed."""
    base, models = make_inputs(1800, 3, dtype, [dtype] * 3, seed=21, zero_frac=0.2)
    densities = (0.05, 0.5, 0.0001)  # the last keeps nothing: k = 0, threshold inf
    staged = kmerge.stage_models([dev(m) for m in models])
    ranks = [(kept_count(d, base.numel()),) for d in densities]
    got, hist = kselect.resident_thresholds(dev(base), staged, ranks, n=base.numel(), block=BLOCK)
    assert tuple(t for (t,) in got) == ref_thresholds(base, models, densities)
    assert hist.shape == (3, BINS) and int(hist.sum()) == 3 * base.numel()


def test_global_scope_thresholds_equal_the_reference():
    """Global scope: the histograms of all tensors add up before the bucket is chosen."""
    tensors = [make_inputs(n, 1, dt, [dt], seed=n) for n, dt in [(1000, BF16), (1500, BF16), (333, F32)]]
    for density in (0.05, 0.3, 1.0):
        taus = {f"t{j}": m[0].float() - b.float() for j, (b, m) in enumerate(tensors)}
        want = ref.trim_thresholds(taus, density, "global")["t0"]
        total = sum(_hist(b, m[0]) for b, m in tensors)
        k = kept_count(density, sum(b.numel() for b, _ in tensors))
        got = threshold_from_histograms(total, k, lambda bucket: sum(_hist(b, m[0], bucket) for b, m in tensors))
        assert got == want


# ---------------------------------------------------------------------------------------
# L1 reductions for LiNeS auto alpha
# ---------------------------------------------------------------------------------------

def test_task_vector_sum_l1():
    base, models = make_inputs(2100, 3, BF16, [BF16, F16, F32], seed=12)
    total = torch.zeros(2100)
    for m in models:
        total = total + (m.float() - base.float())
    want = total.double().abs().sum().item()
    got = kselect.task_vector_sum_l1(dev(base), [dev(m) for m in models], block=BLOCK)
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "linear"])
def test_merged_delta_l1(method):
    base, models = make_inputs(1700, 3, BF16, [BF16] * 3, seed=13)
    spec = spec_for(method, 3, weights=[1.0, 0.5, 0.25], density=0.3, seed=8)
    if method == "linear":
        spec = make_spec("linear", 3, values={"weight": [1.0, 0.5, 0.25]}, lines=LinesSpec(alpha="auto", beta=0.5))
    tau_m = ref.merged_task_vector({NAME: base}, [{NAME: m} for m in models], spec)[NAME]
    got = kmerge.fused_delta_l1(dev(base), [dev(m) for m in models], ElementPlan.from_spec(spec), name=NAME,
                                stats=ref_stats(base, models, spec), block=BLOCK)
    assert got == pytest.approx(tau_m.double().abs().sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a GPU")
def test_tensor_above_2_pow_31_elements():
    """64-bit offsets: a bf16 tensor of more than 2^31 elements, merged with DARE and histogrammed."""
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    need = 4 * 2 * n + (1 << 30)  # base, model, its staged copy, output
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")

    def fill(start, stop):
        idx = torch.arange(start, stop, device="cuda", dtype=torch.int64)
        b = ((idx % 1021).float() * 0.01).to(BF16)
        # delta (idx % 7 - 3) / 8 is exact in bf16 for these magnitudes; 0 where idx % 7 == 3
        return b, (b.float() + ((idx % 7).float() - 3.0) * 0.125).to(BF16)

    base = torch.empty(n, dtype=BF16, device="cuda")
    model = torch.empty(n, dtype=BF16, device="cuda")
    for a in range(0, n, 1 << 28):
        b = min(n, a + (1 << 28))
        base[a:b], model[a:b] = fill(a, b)
    spec = spec_for("dare_linear", 1, density=0.5, seed=3, rescale="inverse")
    out = kmerge.fused_merge(base, [model], ElementPlan.from_spec(spec), name=NAME, scale=1.0, out_dtype=BF16)
    p, divisor = rng.dare_constants(0.5)
    for start in (0, (1 << 31) - 2000, n - 3000):
        sl = slice(start, start + 3000)
        b32, m32 = base[sl].float().cpu(), model[sl].float().cpu()
        keep = rng.dare_uniform(3, 0, NAME, 3000, start=start) >= p
        want = (b32 + torch.tensor(1.0) * torch.where(keep, (m32 - b32) / torch.tensor(divisor), 0.0)).to(BF16)
        assert torch.equal(out[sl].cpu().view(torch.int16), want.view(torch.int16)), start
    del out
    hist = kselect.magnitude_histogram(base, model)
    assert int(hist.sum()) == n
    assert int(hist[0]) == n // 7 + (1 if n % 7 > 3 else 0)
