"""TritonBackend (lines_fast/backends/triton_backend.py) against lines_fast.reference.

Runs TritonBackend("interpret") without a GPU and TritonBackend("cuda") with one, always
with a small chunk so that tensors go in several parts (the streaming path, the element
offsets of DARE, thresholds found over parts). TRITON_INTERPRET must be set before
lines_fast.kernels is imported: tests/conftest.py does it for the whole session.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from lines_fast import reference as ref  # noqa: E402
from lines_fast.backends.base import MergeJob  # noqa: E402
from lines_fast.backends.triton_backend import TritonBackend, import_kernels  # noqa: E402
from lines_fast.errors import NonFiniteInput  # noqa: E402
from lines_fast.layers import lines_scales  # noqa: E402
from lines_fast.backends.cpu import CpuBackend  # noqa: E402
from lines_fast.selection import BINS, tensor_thresholds  # noqa: E402
from lines_fast.methods import REGISTRY  # noqa: E402
from lines_fast.plan import ElementPlan, TensorStats  # noqa: E402
from lines_fast.spec import LinesSpec, MethodSpec, kept_count, make_spec  # noqa: E402

kmerge, _ = import_kernels()
INTERPRET = kmerge._interpreted(kmerge._fused_merge_kernel)
DEVICE = "interpret" if INTERPRET else "cuda"
CHUNK = 1000  # elements per part: the 60 x 50 tensor below goes in 3 parts

pytestmark = [pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                 reason="compiled Triton kernels need a GPU; set TRITON_INTERPRET=1 to interpret")]
if not INTERPRET:
    pytestmark.append(pytest.mark.gpu)

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
SHAPES = {
    "model.embed_tokens.weight": (60, 50),        # bigger than a part
    "model.layers.0.self_attn.q_proj.weight": (17, 23),
    "model.layers.0.input_layernorm.weight": (23,),
    "model.layers.1.mlp.up_proj.weight": (31, 29),
    "model.layers.2.mlp.down_proj.weight": (29, 31),
    "lm_head.weight": (41, 13),
}
NAMES = list(SHAPES)


def backend(**options) -> TritonBackend:
    return TritonBackend(DEVICE, chunk_elements=CHUNK, **options)


def checkpoints(n_models: int, dtype=BF16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    models = []
    for i in range(n_models):
        model = {}
        for n, t in base.items():
            delta = 0.03 * (i + 1) * torch.randn(t.shape, generator=g)
            delta[torch.rand(t.shape, generator=g) < 0.1] = 0.0
            model[n] = (t.float() + delta).to(dtype)
        models.append(model)
    return base, models


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    """docs/methods.md tolerances; on these sizes they amount to bitwise equality except float32 ulps."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == F32:
        assert torch.allclose(got, want, rtol=4 * 2**-23, atol=1e-7 * float(want.abs().max()))
    else:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def method_spec(method: str, n_models: int, *, weights=None, density=0.3, seed=0, normalize=None, lines=None,
                trim_scope=None, rescale=None) -> MethodSpec:
    """The method's spec with these values where it takes them (the registry says which)."""
    given = {"weight": list(weights) if weights else None, "density": density, "seed": seed,
             "normalize": normalize, "trim_scope": trim_scope, "rescale": rescale}
    values = {k: v for k, v in given.items() if v is not None and REGISTRY[method].takes(k)}
    return make_spec(method, n_models, values=values, lines=lines)


def run_merge(be, base, models, spec, scales, out_dtype=None, thresholds=None):
    jobs = [MergeJob(name, None if base is None else base[name], [m[name] for m in models],
                     None if thresholds is None else TensorStats(thresholds[name]), scales[name],
                     out_dtype or (base or models[0])[name].dtype) for name in NAMES]
    results = list(be.merge_many(jobs, ElementPlan.from_spec(spec)))
    assert [job.name for job, _, _ in results] == NAMES  # in job order
    return {job.name: stats for job, _, stats in results}, {job.name: out for job, out, _ in results}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "wise_ft", "della",
                                    "della_linear"])
def test_merge_many_matches_reference(method):
    n_models = 1 if method == "wise_ft" else 3
    base, models = checkpoints(n_models, seed=1)
    weights = None if n_models == 1 else [1.0, 0.6, 1.4]
    spec = method_spec(method, n_models, weights=weights, density=0.3, seed=77)
    want = ref.merge_with_spec(base, models, spec)
    # ties with thresholds None: the backend selects (resident tensors, and the multi-part one);
    # dare_* finds its L1 rescale factors the same way
    stats, got = run_merge(backend(), base, models, spec, dict.fromkeys(NAMES, spec.lam))
    for name in NAMES:
        assert_close_to_reference(got[name], want[name])
    if method == "ties":
        for name in NAMES:
            taus = [{name: m[name].float() - base[name].float()} for m in models]
            assert stats[name].thresholds == tuple(ref.trim_thresholds(t, 0.3, "tensor")[name] for t in taus)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_parts_hold_whole_rows(method):
    """Parts of 777 elements are cut to whole rows (the ranks need them): 750 = 15 rows of 50."""
    base, models = checkpoints(3, seed=2)
    spec = method_spec(method, 3, weights=[1.0, 0.6, 1.4], density=0.4, seed=5)
    be = TritonBackend(DEVICE, chunk_elements=777)
    assert be._part_ranges(3000, 6, row=50)[:2] == [(0, 750), (750, 1500)]
    want = ref.merge_with_spec(base, models, spec)
    _, got = run_merge(be, base, models, spec, dict.fromkeys(NAMES, spec.lam))
    for name in NAMES:
        assert_close_to_reference(got[name], want[name])


def test_global_scope_ties_with_given_thresholds_and_lines():
    base, models = checkpoints(2, seed=2)
    lines = LinesSpec(alpha=0.5, beta=1.0)
    spec = method_spec("ties", 2, weights=[1.0, 1.0], density=0.2, lines=lines, trim_scope="global")
    want = ref.merge_state_dicts(base, models, "ties", density=0.2, trim_scope="global", lines=lines, out_dtype=F32)
    taus = [ref.task_vectors(base, m) for m in models]
    per_model = [ref.trim_thresholds(t, 0.2, "global", NAMES) for t in taus]
    thresholds = {n: tuple(p[n] for p in per_model) for n in NAMES}
    _, got = run_merge(backend(), base, models, spec, lines_scales(NAMES, 0.5, 1.0), out_dtype=F32,
                       thresholds=thresholds)
    for name in NAMES:
        assert_close_to_reference(got[name], want[name])


def test_linear_soup_and_mixed_dtypes():
    base, models = checkpoints(3, seed=3)
    models[1] = {n: t.to(F16) for n, t in models[1].items()}
    models[2] = {n: t.float() for n, t in models[2].items()}
    spec = method_spec("linear", 3, weights=[0.5, 0.25, 0.25])
    want = ref.merge_state_dicts(None, models, "linear", weights=[0.5, 0.25, 0.25], out_dtype=BF16)
    _, got = run_merge(backend(), None, models, spec, dict.fromkeys(NAMES, 1.0), out_dtype=BF16)
    for name in NAMES:
        assert_close_to_reference(got[name], want[name])


def test_runs_are_bitwise_identical():
    base, models = checkpoints(3, seed=4)
    spec = method_spec("dare_ties", 3, weights=[1.0, 1.0, 1.0], seed=5)
    first = run_merge(backend(), base, models, spec, dict.fromkeys(NAMES, 1.0))[1]
    second = run_merge(TritonBackend(DEVICE, chunk_elements=777), base, models, spec, dict.fromkeys(NAMES, 1.0))[1]
    for name in NAMES:  # another chunking too: DARE masks never depend on it
        assert torch.equal(first[name].view(torch.int16), second[name].view(torch.int16))


def test_histograms_and_thresholds():
    base, models = checkpoints(2, dtype=F32, seed=5)
    be = backend()
    name = "model.embed_tokens.weight"  # three parts
    b, m = base[name], models[0][name]
    bits = (m.float() - b.float()).abs().reshape(-1).view(torch.int32)
    hist = be.magnitude_histogram(b, m)
    assert hist.dtype == torch.int64 and hist.device.type == "cpu" and hist.shape == (BINS,)
    nonzero_low = ((bits & 0xFFFF) != 0).to(torch.int32)
    assert torch.equal(hist, torch.bincount((bits >> 16) + 32768 * nonzero_low, minlength=BINS))  # packed
    both = be.magnitude_histograms(b, [mm[name] for mm in models])  # all models in one launch per part
    assert both.shape == (2, BINS) and torch.equal(both[0], hist)
    assert torch.equal(both[1], CpuBackend().magnitude_histogram(b, models[1][name]))
    bucket = int(bits[0] >> 16)
    assert torch.equal(be.magnitude_histogram(b, m, bucket),
                       torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=BINS))
    for density in (0.01, 0.5, 1.0):
        ranks = [(kept_count(density, b.numel()),)] * 2
        got = tuple(t for (t,) in tensor_thresholds(be, b, [mm[name] for mm in models], ranks))
        want = tuple(ref.trim_thresholds({name: mm[name].float() - b.float()}, density, "tensor")[name]
                     for mm in models)
        assert got == want


def test_l1_norms_for_auto_alpha():
    base, models = checkpoints(3, seed=6)
    be = backend()
    spec = method_spec("ties", 3, weights=[1.0, 1.0, 1.0], density=0.4)
    tau_mtl = ref.merged_task_vector(base, models, spec)
    for name in NAMES:
        total = torch.zeros(SHAPES[name])
        for m in models:
            total = total + (m[name].float() - base[name].float())
        want_sum = total.double().abs().sum().item()
        assert be.task_vector_sum_l1(base[name], [m[name] for m in models]) == pytest.approx(want_sum, rel=1e-12)
        job = MergeJob(name, base[name], [m[name] for m in models], None, 1.0, BF16)
        want_mtl = tau_mtl[name].double().abs().sum().item()
        assert be.delta_norms(job, ElementPlan.from_spec(spec), with_task_sum=False)[1] == pytest.approx(
            want_mtl, rel=1e-12)


@pytest.mark.parametrize("chunk", [None, 777])  # one part (thresholds from the same upload), or three
def test_fused_norms_equal_the_separate_ones(chunk):
    base, models = checkpoints(3, seed=9)
    be = TritonBackend(DEVICE, chunk_elements=chunk)
    name = "model.embed_tokens.weight"
    b, ms = base[name], [m[name] for m in models]
    for method in ("ties", "dare_ties", "task_arithmetic"):
        plan = ElementPlan.from_spec(method_spec(method, 3, weights=[1.0, 0.5, 2.0], density=0.3))
        fused = be.delta_norms(MergeJob(name, b, ms, None, 1.0, BF16), plan)
        separate = (be.task_vector_sum_l1(b, ms),
                    be.delta_norms(MergeJob(name, b, ms, None, 1.0, BF16), plan, with_task_sum=False)[1])
        # Equal bits here; on a GPU a DARE launch uses 8 warps, which orders each block's
        # float64 partial sum of |Σ τ| differently from the 4-warp task-sum launch.
        assert fused[1] == separate[1] and fused[0] == pytest.approx(separate[0], rel=1e-14), method
        task_sum = sum(m.float() - b.float() for m in ms).double().abs().sum().item()
        assert fused[0] == pytest.approx(task_sum, rel=1e-12)


def test_nonfinite_inputs_raise():
    base, models = checkpoints(2, seed=7)
    name = "model.layers.1.mlp.up_proj.weight"
    models[1][name][3, 4] = float("nan")
    spec = method_spec("task_arithmetic", 2, weights=[1.0, 1.0])
    with pytest.raises(NonFiniteInput) as err:
        run_merge(backend(), base, models, spec, dict.fromkeys(NAMES, 1.0))
    assert err.value.name == name and err.value.model_index == 1
    with pytest.raises(NonFiniteInput):
        backend().magnitude_histogram(base[name], models[1][name])


def test_empty_tensor():
    be = backend()
    spec = method_spec("ties", 1, weights=[1.0], density=0.5)
    job = MergeJob("empty", torch.zeros(0, 4, dtype=BF16), [torch.zeros(0, 4, dtype=BF16)], None, 1.0, BF16)
    ((_, out, _),) = list(be.merge_many([job], ElementPlan.from_spec(spec)))
    assert out.shape == (0, 4) and out.dtype == BF16


def test_interpreter_must_be_chosen_before_the_kernels_are_imported():
    """enable_interpreter() after a compiled-mode import says what to do instead of misbehaving."""
    code = ("import lines_fast.backends.triton_backend as tb; tb.import_kernels(); "
            "tb.enable_interpreter()")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0 and "before anything imports lines_fast.kernels" in proc.stderr
