"""mergekit's other methods: hand-computed cases for the reference, mergekit 0.1.5's rule written
out independently (sort-based, as its source does) on tie-free data, both backends on the
hand cases, and the bad-input errors. The registry-derived matrix (test_methods.py) covers
every option against the reference on every backend."""
from __future__ import annotations

import math

import pytest
import torch

from lines_fast import jit
from lines_fast import reference as ref
from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.errors import MergeInputError, NonFiniteInput
from lines_fast.plan import ElementPlan
from lines_fast.spec import band_ranks, make_spec

F32 = torch.float32


def merge_one(method, base, models, backend=None, **params):
    """theta for one tensor "w" (float32 output), by the reference or by a backend."""
    spec = ref.spec_from_params(method, len(models), **params)
    if backend is None:
        return ref.merge_with_spec(None if base is None else {"w": base}, [{"w": m} for m in models], spec,
                                   out_dtype=F32)["w"]
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
# passthrough: one product per element, no sum
# ---------------------------------------------------------------------------------------

SIGNED = torch.tensor([-0.0, 0.0, -1.5, 2.0, -0.0, 3.0e-3, -7.0, 0.0], dtype=torch.bfloat16)


def _every_backend():
    yield CpuBackend(chunk=4, compiled=False)
    if jit.kernels() is not None:
        yield CpuBackend(chunk=4, compiled=True)
    yield from list(backends())[1:]


@pytest.mark.parametrize("scale, sign_bits", [
    (1.0, [True, False, True, False, True, False, True, False]),     # the tensor itself
    (0.0, [True, False, True, False, True, False, True, False]),     # -x * 0 is -0.0, as in mergekit
    (-2.0, [False, True, False, True, False, True, False, True]),
])
def test_passthrough_is_one_product_that_keeps_the_sign_of_zero(scale, sign_bits):
    """mergekit's passthrough returns tensor * scale: -0.0 stays -0.0 and 0 * -1.5 is -0.0. A sum
    from +0.0 (linear's, as torch.sum) would make every zero +0.0."""
    want = SIGNED.float() * scale
    assert torch.signbit(want).tolist() == sign_bits
    for backend in [None, *_every_backend()]:
        got = merge_one("passthrough", None, [SIGNED], backend, scale=scale)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), backend
    # linear of one model sums from +0.0, as mergekit's linear (torch.sum): the zeros are +0.0
    soup = merge_one("linear", None, [SIGNED], CpuBackend(chunk=4))
    assert not torch.signbit(soup[SIGNED == 0]).any() and torch.equal(soup, SIGNED.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.bfloat16])
def test_passthrough_of_any_float_dtype_is_the_reference(dtype):
    """The copy path takes only dtypes float32 holds exactly: float64 is still rounded to float32
    as the math says (then stored as float64), and float8 (which torch cannot sum on the CPU) is
    merged, not refused."""
    x = torch.tensor([0.1, 1 / 3, -0.0, -2.5, 448.0, 1e-3], dtype=torch.float64).to(dtype)
    spec = ref.spec_from_params("passthrough", 1)
    want = ref.merge_with_spec(None, [{"w": x}], spec, out_dtype=dtype)["w"]
    assert want.dtype == dtype
    if dtype == torch.float64:   # the math's float32: 0.1 is not 0.1 here
        assert float(want[0]) == float(torch.tensor(0.1, dtype=torch.float32)) != 0.1
    for backend in (CpuBackend(chunk=4, compiled=False), CpuBackend(chunk=4)):
        job = MergeJob("w", None, [x], None, 1.0, dtype)
        ((_, out, _),) = list(backend.merge_many([job], ElementPlan.from_spec(spec)))
        assert out.dtype == dtype and torch.equal(out.view(torch.uint8), want.view(torch.uint8)), backend


def test_passthrough_copy_still_refuses_nonfinite_values():
    """The CPU backend hands a passthrough's values on as they are (plan.copies_input), but still
    names an Inf or NaN, as the merge would; --allow-nonfinite passes it through."""
    assert ElementPlan.from_spec(ref.spec_from_params("passthrough", 1)).copies_input
    assert not ElementPlan.from_spec(ref.spec_from_params("passthrough", 1, scale=0.5)).copies_input
    assert not ElementPlan.from_spec(ref.spec_from_params("linear", 1)).copies_input
    bad = SIGNED.clone()
    bad[5] = float("nan")
    with pytest.raises(NonFiniteInput) as raised:
        merge_one("passthrough", None, [bad], CpuBackend(chunk=4))
    assert raised.value.model_index == 0
    allowed = merge_one("passthrough", None, [bad], CpuBackend(chunk=4, check_finite=False))
    assert torch.isnan(allowed[5]) and torch.equal(allowed[:5].view(torch.int32), SIGNED[:5].float().view(torch.int32))


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


# ---------------------------------------------------------------------------------------
# slerp, nuslerp, model_stock
# ---------------------------------------------------------------------------------------

def test_slerp_hand_example_one_angle_per_tensor():
    """Orthogonal tensors at t = 0.5: both weights sin(pi/4) / sin(pi/2) = sqrt(1/2), for every row;
    parallel tensors (|cos| > 0.9995) interpolate linearly; antipodal ones too."""
    base = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    other = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    half = math.sqrt(0.5)
    want = torch.tensor([[half, half], [0.0, 0.0]])
    got = ref.merge_state_dicts({"w": base}, [{"w": other}], "slerp", t=0.5, out_dtype=F32)["w"]
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    for backend in backends():
        spec = ref.spec_from_params("slerp", 2, t=0.5)
        job = MergeJob("w", None, [base, other], None, 1.0, F32)
        ((_, out, _),) = list(backend.merge_many([job], ElementPlan.from_spec(spec)))
        assert torch.allclose(out, want, rtol=0, atol=1e-7)
    parallel = ref.merge_state_dicts({"n": torch.tensor([1.0, 2.0])}, [{"n": torch.tensor([3.0, 6.0])}], "slerp",
                                     t=0.25, out_dtype=F32)["n"]
    assert torch.allclose(parallel, torch.tensor([1.5, 3.0]))
    antipodal = ref.merge_state_dicts({"n": torch.tensor([1.0, -2.0])}, [{"n": torch.tensor([-1.0, 2.0])}],
                                      "slerp", t=0.25, out_dtype=F32)["n"]
    assert torch.allclose(antipodal, torch.tensor([0.5, -1.0]))


def test_nuslerp_t_from_weights_and_the_base():
    base = torch.zeros(2)
    # tau_0 = e0, tau_1 = e1, weights 1 and 3 -> t = 0.75: weights sin(0.25 pi/2), sin(0.75 pi/2)
    got = merge_one("nuslerp", base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 3.0])
    want = torch.tensor([math.sin(0.125 * math.pi), math.sin(0.375 * math.pi)])
    assert torch.allclose(got, want, rtol=0, atol=1e-7)


def test_nuslerp_without_a_base_interpolates_the_models():
    """mergekit's nuslerp without base_model slerps the models themselves: two orthogonal models of
    norms 2 and 1 at t = 0.75 give sin(pi/8) x_0 + sin(3 pi/8) x_1 (unit-sphere weights on x)."""
    x0, x1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    want = torch.tensor([2 * math.sin(0.125 * math.pi), math.sin(0.375 * math.pi)])
    got = ref.merge_state_dicts(None, [{"w": x0}, {"w": x1}], "nuslerp", weight=[1.0, 3.0], out_dtype=F32)["w"]
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    spec = ref.spec_from_params("nuslerp", 2, with_base=False, weight=[1.0, 3.0])
    for backend in backends():
        job = MergeJob("w", None, [x0, x1], None, 1.0, F32)
        ((_, out, _),) = list(backend.merge_many([job], ElementPlan.from_spec(spec)))
        assert torch.allclose(out, want, rtol=0, atol=1e-7)


def test_nuslerp_without_a_base_end_to_end(tmp_path):
    from lines_fast.engine import merge
    from lines_fast.synth import recipe, write_checkpoint_family

    fam = write_checkpoint_family(tmp_path / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    doc = {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fam.finetunes, (1.0, 2.0))]}
    from helpers import load

    models = [load(p) for p in fam.finetunes]
    want = ref.merge_state_dicts(None, models, "nuslerp", weight=[1.0, 2.0], nuslerp_flatten=False)
    for device in ("cpu", "interpret"):
        merge(doc, tmp_path / device, device=device, progress=False, log=lambda s: None)
        got = load(tmp_path / device)
        assert all(torch.equal(got[n], want[n]) for n in want), device


def test_model_stock_hand_example():
    """Two task vectors at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3; theta = theta0 + t * mean."""
    base = torch.tensor([1.0, 1.0])
    models = [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.5, math.sqrt(0.75)])]
    want = base + (2 / 3) * torch.tensor([0.75, math.sqrt(0.75) / 2])
    assert torch.allclose(merge_one("model_stock", base, models), want, rtol=0, atol=1e-6)
    for backend in backends():
        assert torch.allclose(merge_one("model_stock", base, models, backend), want, rtol=0, atol=1e-6)
    # Opposite task vectors: cos = -1 gives 1 + (N - 1) cos = 0, singular: the base is kept.
    opposite = [base + torch.tensor([1.0, 0.0]), base - torch.tensor([1.0, 0.0])]
    assert torch.equal(merge_one("model_stock", base, opposite), base)


def test_slerp_needs_t_and_exactly_one_other_model():
    with pytest.raises(MergeInputError, match="slerp needs t"):
        make_spec("slerp", 2)
    with pytest.raises(MergeInputError, match=r"slerp merges the base and 1 other model; 2 other models were given"):
        make_spec("slerp", 3, values={"t": 0.5})
    with pytest.raises(MergeInputError, match=r"t 1.5 is outside \[0, 1\]"):
        make_spec("slerp", 2, values={"t": 1.5})


# ---------------------------------------------------------------------------------------
# Per-layer lists ("gradients") and filters
# ---------------------------------------------------------------------------------------

def test_gradient_and_filter_evaluation_as_mergekit():
    from lines_fast.settings import evaluate

    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    # 5 values at t = 0.6: s = 2.4 -> 0.6 * v2 + 0.4 * v3
    assert math.isclose(evaluate([1, 0.5, 0.7, 0.3, 0], "x", 0.6), 0.6 * 0.7 + 0.4 * 0.3)
    assert evaluate([1, 0.5, 0.7, 0.3, 0], "x", 1.0) == 0.0
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}, {"value": 0.5}]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.2
    assert evaluate(setting, "model.norm.weight", 0.0) == 0.5
    assert evaluate({"filter": "mlp", "value": 0.2}, "model.norm.weight", 0.0) is None   # next level decides


def test_depth_fractions():
    from lines_fast.layers import depth_fractions

    names = [f"model.layers.{i}.mlp.w" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    got = depth_fractions(names)
    assert [got[f"model.layers.{i}.mlp.w"] for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert got["model.embed_tokens.weight"] == 0.0 and got["lm_head.weight"] == 0.0


def _five_layer_family(root):
    """A base and two fine-tunes with 5 blocks (t = 0, 0.25, ..., 1) and tensors outside them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    names = [f"model.layers.{i}.{part}.weight" for i in range(5) for part in ("self_attn.q_proj", "mlp.up_proj")]
    names += ["model.embed_tokens.weight", "model.norm.weight"]
    base = {n: torch.randn(6, 4, generator=g).to(torch.bfloat16) for n in names}
    paths = []
    for k, state in enumerate([base] + [{n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
                                          for n, t in base.items()} for _ in range(2)]):
        path = root / f"m{k}"
        path.mkdir(parents=True)
        save_file(state, str(path / "model.safetensors"))
        paths.append((path, state))
    return paths


@pytest.mark.parametrize("device", ["cpu", "interpret"])
def test_per_layer_and_filtered_parameters_through_the_engine(tmp_path, device):
    """A filtered slerp gradient and a ties density gradient per model, merged by the engine, equal
    the reference run tensor by tensor with the values worked out by hand."""
    import yaml

    from lines_fast.checkpoint import Checkpoint
    from lines_fast.config import load_yaml
    from lines_fast.engine import Engine

    if device == "interpret":
        pytest.importorskip("triton")
    (base_dir, base), (ft1_dir, ft1), (ft2_dir, ft2) = _five_layer_family(tmp_path)
    attn, mlp = [0.0, 0.5, 0.3, 0.7, 1.0], [1.0, 0.5, 0.7, 0.3, 0.0]
    configs = {
        "slerp": ({"merge_method": "slerp", "base_model": str(base_dir), "models": [{"model": str(ft1_dir)}],
                   "parameters": {"t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp},
                                        {"value": 0.5}]}},
                  lambda name, t, s: {"t": (0.5 if "layers" not in name else
                                            (attn if "self_attn" in name else mlp)[int(4 * t)])}),
        "ties": ({"merge_method": "ties", "base_model": str(base_dir),
                  "models": [{"model": str(ft1_dir), "parameters": {"density": [0.2, 1.0]}},
                             {"model": str(ft2_dir), "parameters": {"weight": 0.5}}],
                  "parameters": {"density": {"filter": "mlp", "value": 0.3}}},
                 lambda name, t, s: {"density": [0.2 + 0.8 * t, 0.3 if "mlp" in name else 1.0],
                                     "weight": [1.0, 0.5]}),
    }
    for method, (doc, by_hand) in configs.items():
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(doc))
        out = tmp_path / f"out-{method}-{device}"
        Engine(load_yaml(cfg), out, device=device, progress=False, log=lambda m: None).run()
        with Checkpoint.open(out) as merged:
            for name in base:
                layer = int(name.split(".")[2]) if ".layers." in name else None
                t = 0.0 if layer is None else layer / 4
                models = [ft1] if method == "slerp" else [ft1, ft2]
                params = by_hand(name, t, None)
                want = ref.merge_state_dicts({name: base[name]}, [{name: m[name]} for m in models], method,
                                             **params)[name]
                got = merged.tensor(name)
                assert torch.equal(got.float(), want.float()), (method, name, params)


# ---------------------------------------------------------------------------------------
# Consensus merging (TALL masks)
# ---------------------------------------------------------------------------------------

def test_consensus_mask_hand_example():
    """tau = (1, 1, 0), (1, -0.1, 0), (0, 0, 1), (2, 0, 0) per element over three models, lambda 0.4:
    model i matters where |tau_i| >= 0.4 |S - tau_i|. Counts 2, 1, 1, 1 -> only element 0 (k = 2)."""
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([1.0, -0.1, 0.0, 0.0]),
              torch.tensor([0.0, 0.0, 1.0, 0.0])]
    want = torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert torch.equal(merge_one("task_arithmetic", base, models, consensus={"k": 2, "lambda": 0.4}), want)
    for backend in backends():
        got = merge_one("task_arithmetic", base, models, backend, consensus={"k": 2, "lambda": 0.4})
        assert torch.equal(got, want)
    # k = 1 keeps every element where any model matters (all four here): the plain sum.
    assert torch.equal(merge_one("task_arithmetic", base, models, consensus={"k": 1}), sum(models))
    # On ties the mask multiplies the disjoint mean.
    assert torch.equal(merge_one("ties", base, models, consensus={"k": 2}), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_consensus_lambda_per_model_hand_example():
    """The hand example above with lambda_i = (0.4, 0.4, 0): model 3 (lambda 0) matters wherever
    |tau_3| >= 0, everywhere. Counts 3, 2, 1, 2 -> elements 0, 1 and 3 kept (k = 2)."""
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([1.0, -0.1, 0.0, 0.0]),
              torch.tensor([0.0, 0.0, 1.0, 0.0])]
    want = torch.where(torch.tensor([True, True, False, True]), models[0] + models[1] + models[2], 0.0)
    tall = {"k": 2, "lambda": [0.4, 0.4, 0.0]}
    assert torch.equal(merge_one("task_arithmetic", base, models, consensus=tall), want)
    for backend in [*backends(), CpuBackend(chunk=4, compiled=True)]:
        assert torch.equal(merge_one("task_arithmetic", base, models, backend, consensus=tall), want), backend
    # one lambda for all is the same as that lambda listed for each model
    one, listed = ({"k": 2, "lambda": 0.4}, {"k": 2, "lambda": [0.4] * 3})
    assert torch.equal(merge_one("ties", base, models, consensus=one), merge_one("ties", base, models, consensus=listed))


def test_consensus_refusals():
    with pytest.raises(MergeInputError, match="consensus k = 3 needs 3 task vectors"):
        make_spec("task_arithmetic", 2, values={"consensus": {"k": 3}})
    with pytest.raises(MergeInputError, match="consensus: unknown key"):
        make_spec("ties", 2, values={"consensus": {"k": 2, "alpha": 1}})
    with pytest.raises(MergeInputError, match="consensus is not a parameter of dare_ties"):
        make_spec("dare_ties", 2, values={"consensus": {"k": 2}})
    assert make_spec("ties", 2, values={"consensus": {}}).tall == (2, (0.4, 0.4))   # the paper's defaults
    with pytest.raises(MergeInputError, match=r"consensus lambda lists 3 value\(s\) \[0.1, 0.2, 0.3\] for 2 model"):
        make_spec("ties", 2, values={"consensus": {"lambda": [0.1, 0.2, 0.3]}})
    with pytest.raises(MergeInputError, match="lambda -0.5 is outside"):
        make_spec("ties", 2, values={"consensus": {"lambda": [0.1, -0.5]}})


def test_consensus_from_yaml_is_one_value_not_a_filter():
    from lines_fast.config import from_yaml_dict

    doc = {"merge_method": "ties", "base_model": "b", "models": ["x", "y"],
           "parameters": {"density": 0.5, "consensus": {"k": 2, "lambda": 0.3}}}
    config = from_yaml_dict(doc, "c.yml")
    assert not config.per_tensor and config.method_spec().tall == (2, (0.3, 0.3))


# ---------------------------------------------------------------------------------------
# Paper-exact TIES (rule: official)
# ---------------------------------------------------------------------------------------

def official_ties(base: dict, models: list[dict], density: float, lam: float) -> dict:
    """The official TIES code's pipeline, written out from its description: flatten each task
    vector over the whole model; keep |tau| >= its (d - int(density d))-th smallest; elect
    sign(sum), an exact 0 replaced by sign(sum of the signs); mean over the agreeing nonzero
    entries (divided by their count, at least 1); theta = theta_0 + lam * merged."""
    names = list(base)
    flat_base = torch.cat([base[n].float().flatten() for n in names])
    taus = torch.stack([torch.cat([m[n].float().flatten() for n in names]) - flat_base for m in models])
    d = taus.shape[1]
    kth = taus.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    keep = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    flat = flat_base + lam * merged
    out, at = {}, 0
    for n in names:
        out[n] = flat[at:at + base[n].numel()].view(base[n].shape)
        at += base[n].numel()
    return out


@pytest.mark.parametrize("device", ["cpu", "interpret"])
def test_official_rule_reproduces_the_official_ties_code(tmp_path, device):
    import yaml

    from lines_fast.checkpoint import Checkpoint
    from lines_fast.config import load_yaml
    from lines_fast.engine import Engine

    if device == "interpret":
        pytest.importorskip("triton")
    (base_dir, base), (ft1_dir, ft1), (ft2_dir, ft2) = _five_layer_family(tmp_path)
    doc = {"merge_method": "ties", "base_model": str(base_dir),
           "models": [{"model": str(ft1_dir)}, {"model": str(ft2_dir)}],
           "parameters": {"density": 0.2, "lambda": 1.3, "trim_scope": "global", "rule": "official"},
           "out_dtype": "float32"}
    cfg = tmp_path / "official.yml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / f"out-{device}"
    logs = []
    Engine(load_yaml(cfg), out, device=device, progress=False, log=logs.append).run()
    assert any("official TIES: the elected signs sum to" in line for line in logs)
    want = official_ties(base, [ft1, ft2], 0.2, 1.3)
    with Checkpoint.open(out) as merged:
        for name in base:
            assert torch.equal(merged.tensor(name), want[name]), name


def test_official_rule_majority_sign_decides_zero_sums():
    """Where the election sum is exactly 0, the official rule elects the model-wide majority sign."""
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 3.0, 4.0])}, {"w": torch.tensor([-1.0, 2.0, -3.0, 1.0])}]
    # density 1: all kept. Sums (0, 0, 0, 5): signs (0, 0, 0, +) -> majority +1; zero sums take +1:
    # the positive entries' mean: (1, 2, 3, 2.5).
    got = ref.merge_state_dicts(base, models, "ties", density=1.0, trim_scope="global", rule="official",
                                out_dtype=F32)["w"]
    assert torch.equal(got, torch.tensor([1.0, 2.0, 3.0, 2.5]))
    assert torch.equal(got, official_ties(base, models, 1.0 - 1e-9, 1.0)["w"])
    # Sums (0, 0, 0, -5): majority -1, so zero sums take the negative entries.
    models[1]["w"][3] = -9.0
    got = ref.merge_state_dicts(base, models, "ties", density=1.0, trim_scope="global", rule="official",
                                out_dtype=F32)["w"]
    assert torch.equal(got, torch.tensor([-1.0, -2.0, -3.0, -9.0]))


def test_official_rule_refusals():
    with pytest.raises(MergeInputError, match="needs trim_scope: global"):
        make_spec("ties", 2, values={"rule": "official", "density": 0.2})
    with pytest.raises(MergeInputError, match="weight 1 for every model"):
        make_spec("ties", 2, values={"rule": "official", "trim_scope": "global"}, model_values={"weight": [1, 2]})
    with pytest.raises(MergeInputError, match="normalize: true"):
        make_spec("ties", 2, values={"rule": "official", "trim_scope": "global", "normalize": False})


# ---------------------------------------------------------------------------------------
# della, della_linear (CPU backend; the kernels lack the per-row ranked drop)
# ---------------------------------------------------------------------------------------

def test_della_keep_probabilities_by_hand_and_as_mergekit_on_tie_free_rows():
    tau = torch.tensor([[0.1, -0.4, 0.3, 0.2], [5.0, 5.0, -1.0, 0.0]])
    got = ref.della_keep_probability(tau, 0.5, 0.1)
    # Row 0 ranks (strictly smaller magnitudes): 0, 3, 2, 1 -> / 3 -> 0.4 + 0.2 * rank / 3.
    assert torch.allclose(got[0], torch.tensor([0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3], dtype=torch.float64))
    # Row 1 with ties: ranks 2, 2, 1, 0 -> largest 2.
    assert torch.allclose(got[1], torch.tensor([0.6, 0.6, 0.5, 0.4], dtype=torch.float64))
    # mergekit: ranks from argsort(argsort) + 1, normalized by (max - min): the same on tie-free rows.
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(7, 50, generator=g)
    mk_ranks = rows.abs().argsort(dim=1).argsort(dim=1).double() + 1
    mk = 0.35 + (mk_ranks - 1) / (50 - 1) * 0.3
    assert torch.allclose(ref.della_keep_probability(rows, 0.5, 0.15), mk)
    # and the plan's version (the CPU backend's) is the reference's, rounded to float32
    plan = ElementPlan.from_spec(make_spec("della", 1, values={"density": 0.5, "epsilon": 0.15}))
    assert torch.equal(plan.ranked_drop_p(rows, 0), (1 - ref.della_keep_probability(rows, 0.5, 0.15)).float())


def test_della_on_the_cpu_backend_equals_the_reference_and_keeps_about_density():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 300, generator=g)
    models = [base + 0.1 * torch.randn(64, 300, generator=g) for _ in range(2)]
    for method in ("della", "della_linear"):
        got = merge_one(method, base, models, CpuBackend(chunk=1000), density=0.4, epsilon=0.2, seed=9)
        want = merge_one(method, base, models, density=0.4, epsilon=0.2, seed=9)
        assert torch.equal(got, want), method
    # One model, rescale false: the kept fraction is the density on average (0.4 +- 0.2 by rank).
    kept = merge_one("della_linear", base, models[:1], density=0.4, epsilon=0.2, rescale=False) != base
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    # A different stream from DARE's: the same seed draws other masks.
    dare = merge_one("dare_linear", base, models[:1], density=0.4, rescale=False) != base
    assert float((kept != dare).float().mean()) > 0.3


def test_della_refusals(tmp_path):
    with pytest.raises(MergeInputError, match=r"model 1: density 0.1 \+- epsilon 0.15 leaves \(0, 1\)"):
        make_spec("della", 1, values={"density": 0.1})
    make_spec("della", 1, values={"density": 1.0, "epsilon": 0.5})   # density 1 keeps all: no probabilities
    plan = ElementPlan.from_spec(make_spec("della", 1, values={"density": 0.5}))
    with pytest.raises(MergeInputError, match="tensors of 3 or more dims are not supported"):
        plan.rank_row_len((2, 3, 4), "conv.weight")


def test_review_findings_on_settings_and_options(tmp_path):
    """A filter that matches no tensor is refused (a typo would silently keep the default);
    --param reads 1e-3 as a number; a required value given only under filters is checked per
    tensor with a message that says which tensor no entry matches; della on an empty tensor."""
    import yaml

    from lines_fast.cli import _scalar
    from lines_fast.config import from_yaml_dict, load_yaml
    from lines_fast.engine import Engine

    (base_dir, base), (ft1_dir, _), (ft2_dir, _) = _five_layer_family(tmp_path)
    doc = {"merge_method": "ties", "base_model": str(base_dir),
           "models": [{"model": str(ft1_dir)}, {"model": str(ft2_dir)}],
           "parameters": {"density": [{"filter": "self_atn", "value": 0.3}, {"value": 1.0}]}}
    cfg = tmp_path / "typo.yml"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(MergeInputError, match="the filter 'self_atn' of density matches none of the 12"):
        Engine(load_yaml(cfg), tmp_path / "out", device="cpu", progress=False, log=lambda m: None).run()
    assert not (tmp_path / "out").exists()

    assert _scalar("1e-3") == 0.001 and _scalar("3") == 3 and _scalar("true") is True and _scalar("inverse") == "inverse"

    only_filtered = {"merge_method": "slerp", "base_model": "b", "models": ["x"],
                     "parameters": {"t": [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.3}]}}
    config = from_yaml_dict(only_filtered, "c.yml")   # valid: each entry is checked, the first at the probe
    assert config.spec_for_tensor("model.layers.0.mlp.up_proj.weight", 0.0).value("t") == 0.3
    with pytest.raises(MergeInputError, match="tensor model.norm.weight: no entry of t matches it"):
        config.spec_for_tensor("model.norm.weight", 0.0)

    empty = torch.zeros(4, 0)
    assert merge_one("della", empty, [empty, empty], CpuBackend(), density=0.5).shape == (4, 0)
    assert ref.della_keep_probability(empty, 0.5, 0.1).shape == (4, 0)


def test_lines_alpha_auto_counts_only_fine_tuned_models(tmp_path):
    """N of α auto counts fine-tuned models, not a base among the inputs. slerp of a base and
    ft1 = 2·base (parallel: mergekit's lerp) at t = 0.5 is 1.5·base: τ_MTL = 0.5·τ_1, so
    α = ‖τ_1‖₁ / ‖τ_MTL‖₁ / 1 = 2, and with β = 0 the merge is base + 2·0.5·base = ft1 exactly
    (counting the base, N = 2 would give α = 1 and 1.5·base). Then linear with an averaged-in
    base (weights 1, 1): τ_MTL = (ft1 − base) / 2, α = 2 / N with N = 1 (not 2)."""
    from helpers import load, write_safetensors
    from lines_fast.engine import merge
    from lines_fast.reference import LinesSpec

    base = {"model.layers.0.w": torch.tensor([1.0, -2.0, 4.0, 0.5]), "model.layers.1.w": torch.tensor([3.0, 1.0])}
    ft1 = {n: 2 * t for n, t in base.items()}
    for name, tensors in (("base", base), ("ft1", ft1)):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", tensors)
    lines = LinesSpec(alpha="auto", beta=0.0)
    assert all(torch.equal(t, ft1[n]) for n, t in ref.merge_state_dicts(base, [ft1], "slerp", t=0.5, lines=lines).items())
    soup = ref.merge_state_dicts(base, [ft1], "linear", base_weight=1.0, lines=lines)
    assert all(torch.equal(t, ft1[n]) for n, t in soup.items())   # base + 2 * (ft1 - base) / 2
    logs = []
    docs = {"slerp": {"merge_method": "slerp", "base_model": str(tmp_path / "base"), "parameters": {"t": 0.5},
                      "models": [{"model": str(tmp_path / "ft1")}]},
            "linear": {"merge_method": "linear", "base_model": str(tmp_path / "base"), "parameters": {"weight": 1.0},
                       "models": [{"model": str(tmp_path / "ft1")}]}}
    for method, doc in docs.items():
        doc["lines"] = {"alpha": "auto", "beta": 0.0}
        for device in ("cpu", "interpret"):
            merge(doc, tmp_path / f"{method}-{device}", device=device, progress=False, log=logs.append)
            got = load(tmp_path / f"{method}-{device}")
            assert all(torch.equal(got[n], ft1[n]) for n in ft1), (method, device)
    assert sum("= 2\n" in m + "\n" and "/ 1 =" in m for m in logs if m.startswith("LiNeS alpha auto")) == 4
    # The base listed among a soup's models (mergekit averages it in then too) is not counted either.
    listed = {"merge_method": "linear", "base_model": str(tmp_path / "base"), "lines": {"alpha": "auto", "beta": 0.0},
              "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "ft1")}]}
    logs.clear()
    merge(listed, tmp_path / "listed", device="cpu", progress=False, log=logs.append)
    assert all(torch.equal(t, ft1[n]) for n, t in load(tmp_path / "listed").items())
    assert any(m.startswith("LiNeS alpha auto") and "/ 1 = 2" in m for m in logs), logs


def test_lines_alpha_one_beta_zero_is_plain_slerp_and_soup_end_to_end(tmp_path):
    """The engine merges a scale-1 tensor of a soup-like method with the soup's own plan: the
    float32 output of LiNeS α = 1, β = 0 is the plain merge's, bit for bit."""
    from helpers import load
    from lines_fast.engine import merge
    from lines_fast.synth import recipe, write_checkpoint_family

    fam = write_checkpoint_family(tmp_path / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    docs = {"slerp": {"merge_method": "slerp", "base_model": str(fam.base), "parameters": {"t": 0.3},
                      "models": [{"model": str(fam.finetunes[0])}]},
            "linear": {"merge_method": "linear", "base_model": str(fam.base), "parameters": {"weight": 1.0},
                       "models": [{"model": str(p)} for p in fam.finetunes]}}
    differed = 0
    for method, doc in docs.items():
        doc["out_dtype"] = "float32"
        merge(doc, tmp_path / f"{method}-plain", device="cpu", progress=False, log=lambda s: None)
        plain = load(tmp_path / f"{method}-plain")
        base = load(fam.base)
        # 1 + 1e-8 is 1 in float32, the scale the kernels multiply by: the same rule there
        for device, alpha in (("cpu", 1.0), ("interpret", 1.0), ("cpu-near", 1.00000001)):
            merge({**doc, "lines": {"alpha": alpha, "beta": 0.0}}, tmp_path / f"{method}-{device}",
                  device=device.split("-")[0], progress=False, log=lambda s: None)
            got = load(tmp_path / f"{method}-{device}")
            for name, want in plain.items():
                assert torch.equal(got[name].view(-1).view(torch.int32), want.view(-1).view(torch.int32)) \
                    if want.is_floating_point() else torch.equal(got[name], want), (method, device, name)
        # the case the rule is for: base + 1 * (soup - base) is not the soup in float32 here
        differed += sum(int((base[n].float() + (w - base[n].float()) != w).sum()) for n, w in plain.items()
                        if w.is_floating_point() and n in base)
    assert differed > 0
