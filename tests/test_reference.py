"""Tests of lines_fast.reference against numbers worked out by hand from docs/methods.md.

Expected values are literals with the arithmetic in comments; inputs are small dyadic
numbers so float32 computes them exactly and the checks can be exact (torch.equal).
"""
from __future__ import annotations

import pytest
import torch

from lines_fast import reference as ref
from lines_fast import rng
from lines_fast.errors import MergeInputError
from lines_fast.spec import LinesSpec

F32 = torch.float32


def t(*values, dtype=F32):
    return torch.tensor(values, dtype=dtype)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.equal(actual, expected), f"\n{actual}\n!=\n{expected}"


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 and +0.0 differ."""
    return x.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, F32: torch.int32}[x.dtype])


# Shared TIES example: base 1 everywhere, three models.
#   tau1 = [ 3, -2,  0.5, -1,    0  ]
#   tau2 = [-1, -4,  1,    2,    0.5]
#   tau3 = [ 2,  1, -3,    0.25, -1 ]
TIES_BASE = {"w": t(1.0, 1.0, 1.0, 1.0, 1.0)}
TIES_MODELS = [
    {"w": t(4.0, -1.0, 1.5, 0.0, 1.0)},
    {"w": t(0.0, -3.0, 2.0, 3.0, 1.5)},
    {"w": t(3.0, 2.0, -2.0, 1.25, 0.0)},
]
# density 0.6 on 5 elements: k = floor(3.0) = 3.
#   |tau1| = 3,2,0.5,1,0  -> 3rd largest 1 -> tau1^ = [ 3, -2,  0, -1,  0]
#   |tau2| = 1,4,1,2,0.5  -> 3rd largest 1 -> tau2^ = [-1, -4,  1,  2,  0]  (both 1s kept: tie)
#   |tau3| = 2,1,3,0.25,1 -> 3rd largest 1 -> tau3^ = [ 2,  1, -3,  0, -1]  (both 1s kept: tie)
TIES_TRIMMED = [t(3.0, -2.0, 0.0, -1.0, 0.0), t(-1.0, -4.0, 1.0, 2.0, 0.0), t(2.0, 1.0, -3.0, 0.0, -1.0)]


# --------------------------------------------------------------------------- linear

def test_linear_weighted_mean():
    models = [{"w": t(1.0, 2.0, -4.0)}, {"w": t(3.0, 0.0, 4.0)}]
    # weights 1, 3: sum w theta = [1 + 9, 2 + 0, -4 + 12] = [10, 2, 8]; / 4
    assert_exact(ref.merge_state_dicts(None, models, "linear", weights=[1.0, 3.0])["w"], t(2.5, 0.5, 2.0))
    # uniform soup: (A + B) / 2
    assert_exact(ref.merge_state_dicts(None, models, "linear")["w"], t(2.0, 1.0, 0.0))


def test_linear_without_normalize_is_the_weighted_sum():
    models = [{"w": t(1.0, 2.0, -4.0)}, {"w": t(3.0, 0.0, 4.0)}]
    assert_exact(ref.merge_state_dicts(None, models, "linear", weights=[1.0, 3.0], normalize=False)["w"],
                 t(10.0, 2.0, 8.0))


def test_linear_base_weight_averages_the_base_in_first():
    """mergekit's linear with a base_model and a weight for it: the base is one of the inputs."""
    base = {"w": t(4.0, -2.0)}
    models = [{"w": t(1.0, 2.0)}, {"w": t(3.0, 6.0)}]
    # weights 2 (base), 1, 1: (8 + 1 + 3) / 4, (-4 + 2 + 6) / 4
    out = ref.merge_state_dicts(base, models, "linear", base_weight=2.0)
    assert_exact(out["w"], t(3.0, 1.0))
    with pytest.raises(MergeInputError, match="task vectors"):
        ref.merge_state_dicts(base, models, "task_arithmetic", base_weight=1.0)


def test_linear_one_model_returns_it():
    model = {"w": torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    out = ref.merge_state_dicts(None, [model], "linear")
    assert_exact(out["w"], model["w"])


def test_linear_with_base_ignores_it_but_takes_its_dtype_and_non_float_tensors():
    base = {"w": t(100.0, 100.0, dtype=torch.bfloat16), "ids": torch.tensor([7, 8])}
    models = [{"w": t(1.0, 2.0), "ids": torch.tensor([0, 0])}, {"w": t(3.0, 6.0), "ids": torch.tensor([1, 1])}]
    out = ref.merge_state_dicts(base, models, "linear")
    # (1 + 3) / 2, (2 + 6) / 2; the base is not averaged in
    assert_exact(out["w"], t(2.0, 4.0, dtype=torch.bfloat16))
    assert_exact(out["ids"], torch.tensor([7, 8]))
    # without a base, non-float tensors and the dtype come from the first model
    out = ref.merge_state_dicts(None, models, "linear")
    assert_exact(out["w"], t(2.0, 4.0))
    assert_exact(out["ids"], torch.tensor([0, 0]))


def test_linear_weights_summing_to_zero():
    models = [{"w": t(1.0)}, {"w": t(3.0)}]
    with pytest.raises(MergeInputError, match="sum to 0"):
        ref.merge_state_dicts(None, models, "linear", weights=[1.0, -1.0])
    # without normalize nothing divides: 1 - 3
    out = ref.merge_state_dicts(None, models, "linear", weights=[1.0, -1.0], normalize=False)
    assert_exact(out["w"], t(-2.0))


# --------------------------------------------------------------------------- wise_ft

def test_wise_ft_hand_example():
    base = {"w": t(1.0, 2.0, -1.0)}
    model = {"w": t(3.0, 2.0, 1.0)}
    # tau = [2, 0, 2]; a = 0.25: [1 + 0.5, 2 + 0, -1 + 0.5]
    assert_exact(ref.merge_state_dicts(base, [model], "wise_ft", lam=0.25)["w"], t(1.5, 2.0, -0.5))
    # the dispatcher's default a is 0.5: [1 + 1, 2, -1 + 1]
    assert_exact(ref.merge_state_dicts(base, [model], "wise_ft")["w"], t(2.0, 2.0, 0.0))


def test_wise_ft_endpoints_bf16():
    g = torch.Generator().manual_seed(1)
    base_w = torch.randn(64, generator=g).to(torch.bfloat16)
    base_w[0] = -0.0  # a = 0 must keep the sign of zero too
    model_w = (base_w.float() + 0.01 * torch.randn(64, generator=g)).to(torch.bfloat16)
    base, model = {"w": base_w}, {"w": model_w}
    at_zero = ref.merge_state_dicts(base, [model], "wise_ft", lam=0.0)["w"]
    assert at_zero.dtype == torch.bfloat16
    assert torch.equal(bits(at_zero), bits(base_w))
    assert_exact(ref.merge_state_dicts(base, [model], "wise_ft", lam=1.0)["w"], model_w)


def test_wise_ft_needs_exactly_one_model():
    base = {"w": t(0.0)}
    with pytest.raises(MergeInputError, match="exactly 1"):
        ref.merge_state_dicts(base, [{"w": t(1.0)}, {"w": t(2.0)}], "wise_ft")


# --------------------------------------------------------------------------- task_arithmetic

def test_task_arithmetic_hand_example():
    base = {"w": t(0.5, -1.0, 2.0)}
    models = [{"w": t(1.0, -1.0, 1.0)}, {"w": t(0.0, 0.0, 2.5)}]
    # tau1 = [0.5, 0, -1], tau2 = [-0.5, 1, 0.5]
    # weights 1, 2: sum = [0.5 - 1, 0 + 2, -1 + 1] = [-0.5, 2, 0]
    # lam 0.5: [-0.25, 1, 0]; theta = [0.25, 0, 2]
    out = ref.merge_state_dicts(base, models, "task_arithmetic", weights=[1.0, 2.0], **{"lambda": 0.5})
    assert_exact(out["w"], t(0.25, 0.0, 2.0))
    # default lam 1, unit weights: sum = [0, 1, -0.5]; theta = [0.5, 0, 1.5]
    assert_exact(ref.merge_state_dicts(base, models, "task_arithmetic")["w"], t(0.5, 0.0, 1.5))


def test_model_identical_to_base_gives_the_base():
    base = {"w": t(0.5, -1.0, 2.0)}
    for method, kw in [("task_arithmetic", {}), ("ties", {"density": 1.0}), ("dare_ties", {"density": 0.5}),
                       ("dare_linear", {"density": 0.5})]:
        out = ref.merge_state_dicts(base, [dict(base), dict(base)], method, lam=2.0, **kw)
        assert_exact(out["w"], base["w"])


# --------------------------------------------------------------------------- ties building blocks

def test_trim_thresholds_and_trim_hand_example():
    for i, model in enumerate(TIES_MODELS):
        tau = ref.task_vectors(TIES_BASE, model)
        thresholds = ref.trim_thresholds(tau, 0.6, "tensor", ["w"])
        assert thresholds == {"w": 1.0}
        assert_exact(ref.trim(tau["w"], thresholds["w"]), TIES_TRIMMED[i])


def test_trim_keeps_every_tie_at_the_threshold():
    # density 0.25 on 4 elements: k = 1, t = 1; all three |tau| = 1 are kept
    tau = {"w": t(1.0, -1.0, 1.0, 0.5)}
    thresholds = ref.trim_thresholds(tau, 0.25, "tensor")
    assert thresholds == {"w": 1.0}
    assert_exact(ref.trim(tau["w"], 1.0), t(1.0, -1.0, 1.0, 0.0))


def test_trim_density_one_and_k_zero():
    tau = {"w": t(0.25, -3.0, 0.0, 1.0, -0.5)}
    # density 1: k = 5, t = the smallest |tau| = 0: everything kept, the zero stays zero
    assert ref.trim_thresholds(tau, 1.0, "tensor") == {"w": 0.0}
    assert_exact(ref.trim(tau["w"], 0.0), tau["w"])
    # density 0.1 on 5 elements: floor(0.5) = 0, but at least one is kept (mergekit): k = 1, t = 3
    assert ref.trim_thresholds(tau, 0.1, "tensor") == {"w": 3.0}
    assert_exact(ref.trim(tau["w"], 3.0), t(0.0, -3.0, 0.0, 0.0, 0.0))
    # an empty scope keeps nothing: t = inf
    assert ref.trim_thresholds({"e": torch.zeros(0)}, 0.5, "tensor") == {"e": float("inf")}
    assert_exact(ref.trim(tau["w"], float("inf")), torch.zeros(5))


def test_global_and_tensor_scope_differ():
    tau = {"a": t(4.0, 3.0, 2.0, 1.0), "b": t(0.5, -0.25)}
    # tensor scope, density 0.5: a: k = 2 -> t = 3; b: k = 1 -> t = 0.5
    assert ref.trim_thresholds(tau, 0.5, "tensor", ["a", "b"]) == {"a": 3.0, "b": 0.5}
    # global: d = 6, k = 3 over |tau| = 4,3,2,1,0.5,0.25 -> t = 2 for both
    assert ref.trim_thresholds(tau, 0.5, "global", ["a", "b"]) == {"a": 2.0, "b": 2.0}

    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    model = {name: v.clone() for name, v in tau.items()}
    # with one model the TIES result is the trimmed task vector itself
    out = ref.merge_state_dicts(base, [model], "ties", density=0.5, trim_scope="tensor")
    assert_exact(out["a"], t(4.0, 3.0, 0.0, 0.0))
    assert_exact(out["b"], t(0.5, 0.0))
    out = ref.merge_state_dicts(base, [model], "ties", density=0.5, trim_scope="global")
    assert_exact(out["a"], t(4.0, 3.0, 2.0, 0.0))
    assert_exact(out["b"], t(0.0, 0.0))


def test_excluded_tensors_are_copied_and_left_out_of_global_statistics():
    base = {"a": torch.zeros(4), "b": torch.zeros(2), "big": t(5.0, 5.0, dtype=torch.bfloat16)}
    model = {"a": t(4.0, 3.0, 2.0, 1.0), "b": t(0.5, -0.25), "big": t(105.0, -95.0, dtype=torch.bfloat16)}
    # all merged: |tau| = 100,100,4,3,2,1,0.5,0.25; d = 8, k = 4 -> t = 3
    out = ref.merge_state_dicts(base, [model], "ties", density=0.5, trim_scope="global")
    assert_exact(out["a"], t(4.0, 3.0, 0.0, 0.0))
    # "big" excluded: d = 6, k = 3 -> t = 2; "big" is the base's tensor, dtype and all
    out = ref.merge_state_dicts(base, [model], "ties", density=0.5, trim_scope="global", exclude=["^bi"],
                                out_dtype=torch.float16)
    assert_exact(out["a"], t(4.0, 3.0, 2.0, 0.0, dtype=torch.float16))
    assert_exact(out["big"], base["big"])


def test_elect_sign_unit_and_weighted():
    # unit weights: sum = [3-1+2, -2-4+1, 0+1-3, -1+2+0, 0+0-1] = [4, -5, -2, 1, -1]
    assert_exact(ref.elect_sign(TIES_TRIMMED, [1.0, 1.0, 1.0]), t(1.0, -1.0, -1.0, 1.0, -1.0))
    # weights 1, 3, 1: [3-3+2, -2-12+1, 0+3-3, -1+6+0, -1] = [2, -13, 0, 5, -1]; 0 elects +1
    assert_exact(ref.elect_sign(TIES_TRIMMED, [1.0, 3.0, 1.0]), t(1.0, -1.0, 1.0, 1.0, -1.0))


def test_elect_sign_exact_zero_sum_is_plus_one():
    # 1 - 1 = 0 and (-0.5) + 0.5 = 0 (and all-zero): +1
    assert_exact(ref.elect_sign([t(1.0, -0.5, 0.0), t(-1.0, 0.5, 0.0)], [1.0, 1.0]), t(1.0, 1.0, 1.0))


def test_disjoint_merge_hand_example():
    gamma = t(1.0, -1.0, -1.0, 1.0, -1.0)
    # j0 (+): 3, 2 agree -> 5/2;  j1 (-): -2, -4 -> -3;  j2 (-): only -3 (0 never agrees);
    # j3 (+): only 2;  j4 (-): only -1
    assert_exact(ref.disjoint_merge(TIES_TRIMMED, [1.0, 1.0, 1.0], gamma), t(2.5, -3.0, -3.0, 2.0, -1.0))
    # without normalize: [5, -6, -3, 2, -1]
    assert_exact(ref.disjoint_merge(TIES_TRIMMED, [1.0, 1.0, 1.0], gamma, normalize=False),
                 t(5.0, -6.0, -3.0, 2.0, -1.0))
    # no model agrees -> 0 (and no 0/0)
    assert_exact(ref.disjoint_merge([t(0.0, -1.0)], [1.0], t(1.0, 1.0)), t(0.0, 0.0))


# --------------------------------------------------------------------------- ties end to end

def test_ties_hand_example():
    # tau_m = [2.5, -3, -3, 2, -1] (see test_disjoint_merge_hand_example); theta = 1 + tau_m
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.6)
    assert_exact(out["w"], t(3.5, -2.0, -2.0, 3.0, 0.0))
    # lam 0.5: 1 + 0.5 * tau_m
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.6, lam=0.5)
    assert_exact(out["w"], t(2.25, -0.5, -0.5, 2.0, 0.5))
    # normalize false: 1 + [5, -6, -3, 2, -1]
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.6, normalize=False)
    assert_exact(out["w"], t(6.0, -5.0, -2.0, 3.0, 0.0))


def test_ties_weighted_hand_example():
    # weights 1, 3, 1: gamma = [+, -, +, +, -] (j2's sum is exactly 0)
    # j0: (1*3 + 1*2) / (1 + 1) = 2.5;  j1: (1*-2 + 3*-4) / (1 + 3) = -3.5;
    # j2: only model 2 (1, weight 3): 3 / 3 = 1;  j3: only model 2: 6 / 3 = 2;  j4: -1 / 1
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.6, weights=[1.0, 3.0, 1.0])
    assert_exact(out["w"], t(3.5, -2.5, 2.0, 3.0, 0.0))


def test_ties_per_model_density():
    # densities 1, 0.2, 0.2 on 5 elements: k = 5, 1, 1
    # tau1^ = [3, -2, 0.5, -1, 0]; tau2^ = [0, -4, 0, 0, 0]; tau3^ = [0, 0, -3, 0, 0]
    # sum = [3, -6, -2.5, -1, 0] -> gamma = [+, -, -, -, +]
    # tau_m = [3, (-2 - 4)/2, -3, -1, 0] -> theta = [4, -2, -2, 0, 1]
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=[1.0, 0.2, 0.2])
    assert_exact(out["w"], t(4.0, -2.0, -2.0, 0.0, 1.0))


def test_ties_keeps_at_least_one_element_per_model():
    # density 0.1 on 5 elements: k = max(1, floor(0.5)) = 1: each model keeps its largest |tau|
    # tau1^ = [3, 0, 0, 0, 0], tau2^ = [0, -4, 0, 0, 0], tau3^ = [0, 0, -3, 0, 0]; lam 3
    out = ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.1, lam=3.0)
    assert_exact(out["w"], t(10.0, -11.0, -8.0, 1.0, 1.0))


def test_ties_density_one_single_model_is_task_arithmetic():
    g = torch.Generator().manual_seed(2)
    base = {"x": torch.randn(3, 5, generator=g), "y": torch.randn(7, generator=g)}
    model = {name: v + torch.randn(v.shape, generator=g) for name, v in base.items()}
    a = ref.merge_state_dicts(base, [model], "ties", density=1.0, lam=1.0)
    b = ref.merge_state_dicts(base, [model], "task_arithmetic", lam=1.0)
    for name in base:
        assert_exact(a[name], b[name])


def test_ties_rejects_bad_scope():
    with pytest.raises(MergeInputError, match="trim_scope"):
        ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=0.5, trim_scope="layer")


def test_ties_agreeing_weights_cancelling_is_an_error():
    base = {"w": t(0.0)}
    # the disjoint mean divides by the agreeing weights: a negative weight could make that 0
    with pytest.raises(MergeInputError, match="must be positive"):
        ref.merge_state_dicts(base, [{"w": t(1.0)}, {"w": t(1.0)}], "ties", density=1.0, weights=[1.0, -1.0])
    # without normalize it is a weighted sum over A, and A follows the sign of w_i * tau_i:
    # contributions +1 and -1 sum to 0 -> gamma = +1 -> A = {model 0} -> 1
    out = ref.merge_state_dicts(base, [{"w": t(1.0)}, {"w": t(1.0)}], "ties", density=1.0, weights=[1.0, -1.0],
                                normalize=False)
    assert_exact(out["w"], t(1.0))
    # contributions -2 (w = -2, tau = +1) and +1: gamma = -1 -> A = {model 0} -> -2
    out = ref.merge_state_dicts(base, [{"w": t(1.0)}, {"w": t(1.0)}], "ties", density=1.0, weights=[-2.0, 1.0],
                                normalize=False)
    assert_exact(out["w"], t(-2.0))


# --------------------------------------------------------------------------- DARE

def test_dare_mask_is_the_rng_function():
    tau = torch.arange(1, 201, dtype=F32)  # no zeros, so zeros in the output are drops
    dropped = ref.dare_drop(tau, 0.5, seed=7, model_index=1, name="enc.w")
    u = rng.dare_uniform(7, 1, "enc.w", 200)
    # density 0.5: p = 0.5, divisor = 0.5 (both exact); keep iff u >= 0.5, value tau / 0.5
    assert_exact(dropped, torch.where(u >= 0.5, 2 * tau, torch.zeros(200)))
    assert 0 < int((dropped == 0).sum()) < 200


def test_dare_mask_uses_flat_indices_for_any_shape():
    tau = torch.ones(6, 5)
    u = rng.dare_uniform(3, 0, "m", 30).view(6, 5)
    assert_exact(ref.dare_drop(tau, 0.5, 3, 0, "m") != 0, u >= 0.5)


def test_dare_masks_depend_on_seed_model_and_name_only():
    tau = torch.ones(4096)

    def mask(seed, i, name):
        return ref.dare_drop(tau, 0.5, seed, i, name) != 0

    m = mask(0, 0, "a.weight")
    assert torch.equal(m, mask(0, 0, "a.weight"))
    assert not torch.equal(m, mask(1, 0, "a.weight"))
    assert not torch.equal(m, mask(0, 1, "a.weight"))
    assert not torch.equal(m, mask(0, 0, "b.weight"))


def test_dare_kept_fraction_is_near_density():
    n = 50_000
    kept = ref.dare_drop(torch.ones(n), 0.3, 0, 0, "big") != 0
    # binomial sd = sqrt(0.3 * 0.7 / n) ~ 0.002; allow 5 sd
    assert abs(kept.float().mean().item() - 0.3) < 0.01


def test_dare_linear_matches_its_formula():
    base = {"w": torch.full((64,), 0.5)}
    models = [{"w": torch.full((64,), 1.5)}, {"w": torch.full((64,), 0.25)}]
    # tau1 = 1, tau2 = -0.25; density 0.5 -> kept values 2 and -0.5
    # theta = 0.5 + lam * (w1 * 2 * keep1 + w2 * -0.5 * keep2), lam = 0.5, weights 1, 2
    keep1 = rng.dare_uniform(11, 0, "w", 64) >= 0.5
    keep2 = rng.dare_uniform(11, 1, "w", 64) >= 0.5
    expected = 0.5 + 0.5 * (2.0 * keep1.float() - 1.0 * keep2.float())
    out = ref.merge_state_dicts(base, models, "dare_linear", density=0.5, lam=0.5, weights=[1.0, 2.0], seed=11,
                                rescale="inverse")
    assert_exact(out["w"], expected)


def test_dare_ties_matches_its_formula():
    base = {"w": torch.zeros(64)}
    models = [{"w": torch.full((64,), 1.0)}, {"w": torch.full((64,), 3.0)}]
    # density 0.5: kept values 2 and 6, both positive, so gamma = + and the disjoint
    # mean is over the kept ones: both (2 + 6) / 2 = 4, one 2 or 6, none 0
    keep1 = rng.dare_uniform(5, 0, "w", 64) >= 0.5
    keep2 = rng.dare_uniform(5, 1, "w", 64) >= 0.5
    expected = torch.where(keep1 & keep2, 4.0, torch.where(keep1, 2.0, torch.where(keep2, 6.0, 0.0)))
    out = ref.merge_state_dicts(base, models, "dare_ties", density=0.5, seed=5, rescale="inverse", normalize=True)
    assert_exact(out["w"], expected)


def test_dare_rescale_true_matches_each_tensors_l1_norm():
    """mergekit's rescale (the default): kept values times ||tau||_1 / ||kept tau||_1 per tensor."""
    base = {"w": torch.zeros(64)}
    models = [{"w": torch.full((64,), 1.0)}, {"w": torch.full((64,), 3.0)}]
    keep1 = rng.dare_uniform(5, 0, "w", 64) >= 0.5
    keep2 = rng.dare_uniform(5, 1, "w", 64) >= 0.5
    # tau_i is constant, so the factor is 64 / (number kept) and the kept values sum back to 64 * tau
    f1, f2 = 64 / int(keep1.sum()), 64 / int(keep2.sum())
    expected = torch.where(keep1, torch.tensor(f1, dtype=F32), 0.0) + torch.where(keep2, torch.tensor(f2, dtype=F32)
                                                                                 * 3.0, 0.0)
    out = ref.merge_state_dicts(base, models, "dare_linear", density=0.5, seed=5)
    assert_exact(out["w"], expected)
    assert float(out["w"].sum()) == pytest.approx(64 * 4.0, rel=1e-6)
    # false: kept values unchanged
    out = ref.merge_state_dicts(base, models, "dare_linear", density=0.5, seed=5, rescale=False)
    assert_exact(out["w"], torch.where(keep1, 1.0, 0.0) + torch.where(keep2, 3.0, 0.0))


def test_ties_rescale_true_l1_matches_the_trimmed_vector():
    # TIES_MODELS, density 0.6: |tau1| sums to 6.5, its trimmed part to 6 -> factor 6.5 / 6
    tau = ref.task_vectors(TIES_BASE, TIES_MODELS[0])["w"]
    keep = tau.abs() >= 1.0
    assert ref.l1_rescale_factor(tau, keep) == float(torch.tensor(6.5 / 6, dtype=F32))
    plain = ref.merge_state_dicts(TIES_BASE, TIES_MODELS[:1], "ties", density=0.6)["w"]
    rescaled = ref.merge_state_dicts(TIES_BASE, TIES_MODELS[:1], "ties", density=0.6, rescale=True)["w"]
    assert_exact(rescaled - 1.0, (plain - 1.0) * torch.tensor(6.5 / 6, dtype=F32))


def test_dare_density_one_is_task_arithmetic_and_ties():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(50, generator=g)}
    models = [{"w": base["w"] + torch.randn(50, generator=g)} for _ in range(3)]
    assert_exact(ref.merge_state_dicts(base, models, "dare_linear", density=1.0, lam=0.7)["w"],
                 ref.merge_state_dicts(base, models, "task_arithmetic", lam=0.7)["w"])
    assert_exact(ref.merge_state_dicts(base, models, "dare_ties", density=1.0, seed=9)["w"],
                 ref.merge_state_dicts(base, models, "ties", density=1.0, normalize=False)["w"])


# --------------------------------------------------------------------------- LiNeS

def _ones_model(names, value):
    return {name: torch.full((2,), value) for name in names}


def test_lines_alpha_one_beta_zero_is_the_plain_method():
    names = ["model.embed.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w"]
    g = torch.Generator().manual_seed(4)
    base = {n: torch.randn(8, generator=g) for n in names}
    models = [{n: v + torch.randn(8, generator=g) for n, v in base.items()} for _ in range(2)]
    plain_lines = LinesSpec(alpha=1.0, beta=0.0)
    for method, kw in [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})]:
        a = ref.merge_state_dicts(base, models, method, lam=1.0, **kw)
        b = ref.merge_state_dicts(base, models, method, lines=plain_lines, **kw)
        for n in names:
            assert_exact(b[n], a[n])


def test_lines_single_block_gets_alpha():
    # L = 1: lambda(0) = alpha = 0.5 whatever beta; tau = 2 -> theta = 1 + 1
    names = ["layers.0.w", "head.w"]
    out = ref.merge_state_dicts(_ones_model(names, 1.0), [_ones_model(names, 3.0)], "task_arithmetic",
                                lines=LinesSpec(alpha=0.5, beta=4.0))
    assert_exact(out["layers.0.w"], torch.full((2,), 2.0))
    assert_exact(out["head.w"], torch.full((2,), 2.0))


def test_lines_t5_stacks_each_with_their_own_depth():
    names = ["shared.weight", "encoder.block.0.layer.0.w", "encoder.block.1.layer.1.w", "encoder.block.2.layer.0.w",
             "decoder.block.0.layer.2.w", "decoder.block.1.layer.0.w"]
    base, model = _ones_model(names, 0.0), _ones_model(names, 1.0)  # tau = 1
    # alpha 0.5, beta 1: encoder L = 3 -> 0.5, 1.0, 1.5; decoder L = 2 -> 0.5, 1.5
    expected = {"shared.weight": 0.5, "encoder.block.0.layer.0.w": 0.5, "encoder.block.1.layer.1.w": 1.0,
                "encoder.block.2.layer.0.w": 1.5, "decoder.block.0.layer.2.w": 0.5, "decoder.block.1.layer.0.w": 1.5}
    out = ref.merge_state_dicts(base, [model], "task_arithmetic", lines=LinesSpec(alpha=0.5, beta=1.0))
    for n in names:
        assert_exact(out[n], torch.full((2,), expected[n]))
    # outside="last": the shared embedding gets alpha + beta = 1.5
    out = ref.merge_state_dicts(base, [model], "task_arithmetic",
                                lines=LinesSpec(alpha=0.5, beta=1.0, outside="last"))
    assert_exact(out["shared.weight"], torch.full((2,), 1.5))


def test_lines_edit_gamma_form():
    names = ["embed.w", "layers.0.w", "layers.1.w"]
    # gamma 0.5: alpha 0.5, beta 0.5; L = 2 -> 0.5, 1.0; outside 0.5. tau = 2, base 1
    out = ref.lines_edit(_ones_model(names, 1.0), _ones_model(names, 3.0), 0.5)
    assert_exact(out["embed.w"], torch.full((2,), 2.0))
    assert_exact(out["layers.0.w"], torch.full((2,), 2.0))
    assert_exact(out["layers.1.w"], torch.full((2,), 3.0))


def test_lines_linear_uses_the_weighted_mean_task_vector():
    base = {"layers.0.w": t(1.0, 1.0)}
    models = [{"layers.0.w": t(3.0, 1.0)}, {"layers.0.w": t(1.0, 5.0)}]
    # tau1 = [2, 0], tau2 = [0, 4]; tau_MTL = [1, 2]; L = 1 -> scale alpha = 2; theta = [3, 5]
    out = ref.merge_state_dicts(base, models, "linear", lines=LinesSpec(alpha=2.0, beta=1.0))
    assert_exact(out["layers.0.w"], t(3.0, 5.0))
    with pytest.raises(MergeInputError, match="base"):
        ref.merge_state_dicts(None, models, "linear", lines=LinesSpec(alpha=2.0, beta=1.0))


def test_lines_auto_alpha_task_arithmetic_is_one_over_n():
    g = torch.Generator().manual_seed(5)
    base = {"layers.0.w": torch.randn(16, generator=g), "layers.1.w": torch.randn(16, generator=g)}
    models = [{n: v + torch.randn(16, generator=g) for n, v in base.items()} for _ in range(4)]
    tau_mtl = ref.merged_task_vector(base, models, ref.spec_from_params("task_arithmetic", 4))
    assert ref.lines_auto_alpha(base, models, tau_mtl) == 0.25
    # beta 0: theta = base + 0.25 * sum tau = plain task arithmetic with lam 0.25
    out = ref.merge_state_dicts(base, models, "task_arithmetic", lines=LinesSpec(alpha="auto", beta=0.0))
    plain = ref.merge_state_dicts(base, models, "task_arithmetic", lam=0.25)
    for n in base:
        assert_exact(out[n], plain[n])


def test_lines_auto_alpha_ties_hand_example():
    # sum tau (untrimmed) = [4, -5, -1.5, 1.25, -0.5] -> L1 12.25
    # tau_MTL = [2.5, -3, -3, 2, -1] -> L1 11.5; alpha = 12.25 / 11.5 / 3
    tau_mtl = ref.merged_task_vector(TIES_BASE, TIES_MODELS, ref.spec_from_params("ties", 3, density=0.6))
    assert ref.lines_auto_alpha(TIES_BASE, TIES_MODELS, tau_mtl) == 12.25 / 11.5 / 3


def test_lines_auto_alpha_zero_merged_norm_is_an_error():
    base = {"layers.0.w": t(1.0, 2.0)}
    with pytest.raises(MergeInputError, match="L1 norm"):
        ref.merge_state_dicts(base, [dict(base)], "task_arithmetic", lines=LinesSpec(alpha="auto", beta=0.5))


# --------------------------------------------------------------------------- dtypes and copies

def test_non_float_tensors_are_copied_from_the_base():
    base = {"w": t(1.0, 2.0), "pos": torch.tensor([3, 4], dtype=torch.int64), "mask": torch.tensor([True, False])}
    model = {"w": t(2.0, 2.0), "pos": torch.tensor([9, 9]), "mask": torch.tensor([False, True])}
    out = ref.merge_state_dicts(base, [model], "ties", density=1.0)
    assert list(out) == ["w", "pos", "mask"]
    assert_exact(out["pos"], base["pos"])
    assert_exact(out["mask"], base["mask"])
    assert_exact(out["w"], t(2.0, 2.0))


def test_bf16_inputs_round_to_nearest_even():
    base = {"w": t(1.0, 1.0, dtype=torch.bfloat16)}
    model = {"w": t(1.0078125, 1.0078125, dtype=torch.bfloat16)}  # tau = 2^-7 (1 bf16 ulp at 1)
    # two models, lam 0.25: 1 + 0.25 * 2^-6 = 1 + 2^-8, halfway between 1 and 1 + 2^-7 -> even: 1
    out = ref.merge_state_dicts(base, [model, model], "task_arithmetic", lam=0.25)
    assert_exact(out["w"], t(1.0, 1.0, dtype=torch.bfloat16))
    # lam 0.75: 1 + 3 * 2^-8, halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even) -> 1.015625
    out = ref.merge_state_dicts(base, [model, model], "task_arithmetic", lam=0.75)
    assert_exact(out["w"], t(1.015625, 1.015625, dtype=torch.bfloat16))
    # out_dtype float32 keeps the float32 result
    out = ref.merge_state_dicts(base, [model, model], "task_arithmetic", lam=0.75, out_dtype=F32)
    assert_exact(out["w"], t(1.01171875, 1.01171875))


def test_dispatch_composes_the_building_blocks():
    """merge_state_dicts follows the registry's composition: the same steps done by hand."""
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(32, generator=g)}
    models = [{"w": base["w"] + torch.randn(32, generator=g)} for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    taus = [ref.task_vectors(base, m)["w"] for m in models]
    # ties: trim per tensor, elect with the weights, disjoint mean, then theta0 + lam * tau_m
    trimmed = [ref.trim(tau, ref.trim_thresholds({"w": tau}, 0.4, "tensor")["w"]) for tau in taus]
    tau_m = ref.disjoint_merge(trimmed, w, ref.elect_sign(trimmed, w))
    by_hand = base["w"] + torch.tensor(1.2) * tau_m
    assert_exact(ref.merge_state_dicts(base, models, "ties", weights=w, density=0.4, lam=1.2)["w"], by_hand)
    # dare_ties, rescale inverse: drop, elect, weighted sum over the agreeing ones (normalize false)
    dropped = [ref.dare_drop(tau, d, 3, i, "w") for i, (tau, d) in enumerate(zip(taus, [0.2, 0.4, 0.6]))]
    tau_m = ref.disjoint_merge(dropped, w, ref.elect_sign(dropped, w), normalize=False)
    assert_exact(ref.merge_state_dicts(base, models, "dare_ties", weights=w, density=[0.2, 0.4, 0.6], seed=3,
                                       rescale="inverse")["w"], base["w"] + tau_m)
    # task_arithmetic with normalize: sum_i w_i tau_i / sum_i w_i
    total = torch.zeros(32)
    for wi, tau in zip(w, taus):
        total = total + torch.tensor(wi) * tau
    assert_exact(ref.merge_state_dicts(base, models, "task_arithmetic", weights=w, normalize=True)["w"],
                 base["w"] + torch.tensor(1.0) * (total / torch.tensor(3.5)))


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(density):
    with pytest.raises(MergeInputError, match="density"):
        ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=density)


def test_density_one_per_model_and_refused_where_unused():
    with pytest.raises(MergeInputError, match="2 density values for 3 models"):
        ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=[0.5, 0.5])
    # a parameter the method does not take is an error that names it, never ignored
    with pytest.raises(MergeInputError, match="density is not a parameter of task_arithmetic"):
        ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "task_arithmetic", density=0.5)
    with pytest.raises(MergeInputError, match="weight is not a parameter of wise_ft"):
        ref.merge_state_dicts(TIES_BASE, TIES_MODELS[:1], "wise_ft", weights=[2.0])
    # mergekit's default density is 1: keep everything
    assert_exact(ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties")["w"],
                 ref.merge_state_dicts(TIES_BASE, TIES_MODELS, "ties", density=1.0)["w"])


def test_shape_mismatch_is_an_error_never_broadcast():
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(MergeInputError, match="shape"):
        ref.merge_state_dicts(base, [{"w": torch.zeros(1, 3)}], "task_arithmetic")
    with pytest.raises(MergeInputError, match="shape"):
        ref.merge_state_dicts(None, [{"w": torch.zeros(3)}, {"w": torch.zeros(1)}], "linear")


def test_missing_tensor_unknown_method_and_missing_base():
    base = {"w": t(0.0), "v": t(0.0)}
    with pytest.raises(MergeInputError, match="missing"):
        ref.merge_state_dicts(base, [{"w": t(1.0)}], "task_arithmetic")
    with pytest.raises(MergeInputError, match="unknown merge method"):
        ref.merge_state_dicts(base, [dict(base)], "karcher")
    with pytest.raises(MergeInputError, match="base"):
        ref.merge_state_dicts(None, [dict(base)], "ties", density=0.5)
