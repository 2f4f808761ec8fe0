"""The pure-PyTorch reference of every merge method (docs/methods.md states the math).

Written to be read and trusted, not to be fast: whole state dicts in memory, every step a
separate float32 tensor operation in the order docs/methods.md writes it. Every backend is
tested against this module, and its building blocks (thresholds, signs, DARE masks, rescale
factors) are the exact values a fast path must reproduce.

Summation order is part of the contract, because float32 addition is not associative:
every sum over models runs i = 0..N-1 as `acc = acc + c_i`, starting from zeros, with
c_i = w_i * x_i a float32 product. The final step is theta = theta0 + scale * tau_m as two
float32 operations (multiply, then add), then one cast to the output dtype
(round-to-nearest-even).

Dispatch comes from the method registry (lines_fast/methods.py): `merged_task_vector`
composes the method's steps -- its inputs (task vectors or the models), its sparsifier
(SPARSIFIERS), the rescale of the kept values, and its consensus step (CONSENSUS) -- so
this module holds one function per step, never one per method name.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from . import rng
from .errors import MergeInputError
from .exactsum import AbsSum
from .layers import lines_scales
from .methods import Coefficients, Consensus, Inputs, Rescale, Sparsify
from .plan import rescale_factor
from .spec import LinesSpec, MethodSpec, band_ranks, kept_count, make_spec, official_kept_count

StateDict = dict[str, torch.Tensor]
F32 = torch.float32


def _f32(x: float) -> torch.Tensor:
    """A Python number as a 0-dim float32 tensor, so every product below is float32 x float32."""
    return torch.tensor(x, dtype=F32)


# ---------------------------------------------------------------------------------------
# Input checks (simple ones; the engine validates more fully and earlier)
# ---------------------------------------------------------------------------------------

def _float_names(state: StateDict) -> list[str]:
    return [name for name, tensor in state.items() if tensor.is_floating_point()]


def _merged_names(reference: StateDict, exclude: Sequence[str] | None) -> list[str]:
    """The float tensors of `reference` that no exclude regex matches (re.search)."""
    patterns = []
    for pattern in exclude or ():
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise MergeInputError(f"exclude pattern {pattern!r} is not a valid regular expression ({err}).") from None
    return [name for name in _float_names(reference) if not any(p.search(name) for p in patterns)]


def _check_tensors(reference: StateDict, models: Sequence[StateDict], names: Sequence[str]) -> None:
    """Every model has every merged tensor, with the reference's shape (never broadcast)."""
    if not models:
        raise MergeInputError("No fine-tuned models given: a merge needs at least one.")
    for name in names:
        shape = reference[name].shape
        for i, model in enumerate(models):
            if name not in model:
                raise MergeInputError(f"Tensor {name!r} is missing from model {i}; every model must have it.")
            if model[name].shape != shape:
                raise MergeInputError(
                    f"Tensor {name!r} has shape {tuple(model[name].shape)} in model {i} but "
                    f"{tuple(shape)} in the base (or first model); shapes must match exactly."
                )


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def task_vectors(base: StateDict, model: StateDict, names: Sequence[str] | None = None) -> StateDict:
    """tau = float32(model) - float32(base) for `names` (default: every float tensor of base)."""
    names = _float_names(base) if names is None else names
    return {name: model[name].to(F32) - base[name].to(F32) for name in names}


def kth_largest_abs(values: torch.Tensor, k: int) -> float:
    """The k-th largest |value| (1 <= k <= numel); inf (keep nothing, or no ceiling) when k = 0."""
    magnitudes = values.flatten().abs()
    if k == 0:
        return math.inf
    # The k-th largest of d values is the (d - k + 1)-th smallest.
    return torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values.item()


def _kth_largest_abs(values: torch.Tensor, density: float) -> float:
    """The k-th largest |value|, k = kept_count(density, numel); inf (keep nothing) when k = 0."""
    return kth_largest_abs(values, kept_count(density, values.numel()))


def band_thresholds(tau: torch.Tensor, density: float, gamma: float) -> tuple[float, float]:
    """breadcrumbs' (floor, ceiling) over one tensor: keep floor <= |tau| < ceiling (band_ranks)."""
    k_floor, k_ceiling = band_ranks(density, gamma, tau.numel())
    return kth_largest_abs(tau, k_floor), kth_largest_abs(tau, k_ceiling)


def trim_thresholds(
    task_vectors_of_model: StateDict, density: float, scope: str, names: Sequence[str] | None = None
) -> dict[str, float]:
    """TIES step 1 thresholds t (keep |tau| >= t) for one model, per tensor name.

    scope "tensor": one threshold per tensor, d = its numel. scope "global": one threshold
    over all `names` together (d = their total numel), repeated for each name. Values are
    float32 numbers held as Python floats; float('inf') means k = 0 (an empty scope).
    """
    names = list(task_vectors_of_model) if names is None else list(names)
    if scope == "tensor":
        return {name: _kth_largest_abs(task_vectors_of_model[name], density) for name in names}
    if scope == "global":
        if not names:
            return {}
        everything = torch.cat([task_vectors_of_model[name].flatten() for name in names])
        return dict.fromkeys(names, _kth_largest_abs(everything, density))
    raise MergeInputError(f"trim_scope {scope!r} is not 'tensor' or 'global'.")


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep tau where |tau| >= threshold (all ties at the threshold kept), else 0."""
    return torch.where(tau.abs() >= threshold, tau, _f32(0.0))


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * x_i in float32, in model order, starting from zeros."""
    acc = torch.zeros_like(tensors[0], dtype=F32)
    for x, w in zip(tensors, weights):
        acc = acc + _f32(w) * x
    return acc


def elect_sign(trimmed: Sequence[torch.Tensor], weights: Sequence[float], zero_sign: float = 1.0) -> torch.Tensor:
    """TIES step 2: gamma = sign(sum_i w_i * tau_hat_i), zero_sign where the sum is 0 (incl. -0.0):
    +1, or the official rule's model-wide majority sign.

    Returned as a float32 tensor of +1.0 / -1.0.
    """
    total = _weighted_sum(trimmed, weights)
    return torch.where(total > 0, _f32(1.0), torch.where(total < 0, _f32(-1.0), _f32(zero_sign)))


def majority_sign(trimmed: Sequence[StateDict], weights: Sequence[float], names: Sequence[str]) -> float:
    """The official TIES code's sign at a zero election sum: sign(sum over every merged element of
    sign(sum_i w_i tau_hat_i)), +1 where that is 0 too."""
    total = sum(int(torch.sign(_weighted_sum([t[name] for t in trimmed], weights)).sum()) for name in names)
    return -1.0 if total < 0 else 1.0


def disjoint_merge(
    trimmed: Sequence[torch.Tensor], weights: Sequence[float], gamma: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """TIES step 3: the weighted mean over the agreeing models A (0 where A is empty).

    A = {i : w_i tau_hat_i != 0 and sign(w_i tau_hat_i) == gamma}: the weighted
    contribution's sign, as mergekit (the same as sign(tau_hat_i) for positive weights).
    Without normalize, the weighted sum over A. Numerator and denominator are summed in
    model order like every other sum.
    """
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    any_agree = torch.zeros_like(gamma, dtype=torch.bool)
    for tau_hat, w in zip(trimmed, weights):
        contribution = _f32(w) * tau_hat
        agree = (contribution != 0) & (torch.sign(contribution) == gamma)
        numerator = numerator + torch.where(agree, contribution, _f32(0.0))
        denominator = denominator + torch.where(agree, _f32(w), _f32(0.0))
        any_agree = any_agree | agree
    if not normalize:
        return numerator
    # With positive weights the denominator is 0 exactly where A is empty; weights of
    # mixed sign can cancel over a non-empty A, where the mean is undefined.
    if bool((any_agree & (denominator == 0)).any()):
        raise MergeInputError(
            "The weights of the models that agree with the elected sign sum to 0 for some "
            "elements, so their weighted mean is undefined. Use positive weights or normalize: false."
        )
    return torch.where(any_agree, numerator / denominator, _f32(0.0))


def dare_keep(numel: int, density: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """DARE's keep mask over a tensor's flat (row-major) indices: u(seed, i, name, j) >= p."""
    p, _ = rng.dare_constants(density)
    return rng.dare_uniform(seed, model_index, name, numel) >= p


def dare_drop(tau: torch.Tensor, density: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """DARE with the paper's rescale (`rescale: inverse`): kept tau[j] / q, else 0.

    p and q = float32(1 - p) come from rng.dare_constants; u from rng.dare_uniform over the
    tensor's flat (row-major) indices, so the mask depends on nothing else.
    """
    _, divisor = rng.dare_constants(density)
    keep = dare_keep(tau.numel(), density, seed, model_index, name).view(tau.shape)
    return torch.where(keep, tau / _f32(divisor), _f32(0.0))


def l1_rescale_factor(tau: torch.Tensor, keep: torch.Tensor) -> float:
    """mergekit's rescale: float32(||tau||_1 / ||kept tau||_1) over the tensor, exact sums
    (lines_fast/exactsum.py); 1 where either norm is below 1e-7."""
    total, kept = AbsSum(), AbsSum()
    total.add(tau)
    kept.add(torch.where(keep, tau, _f32(0.0)))
    return rescale_factor(total.value(), kept.value())


def apply_task_vector(base: StateDict, tau_m: StateDict, scale: float | dict[str, float],
                      own: StateDict | None = None) -> StateDict:
    """theta = float32(base) + scale * tau_m per tensor (multiply, then add, in float32).

    `scale` is lambda, or a per-name dict (LiNeS). A zero scale returns float32(base)
    exactly: base + 0 * tau would turn a -0.0 of the base into +0.0, and wise_ft with
    a = 0 must return the base bitwise. own: for a method whose result is a model (a soup,
    slerp), that result θ_method, with tau_m = θ_method - base: a scale of 1 returns it
    exactly, where base + 1 * tau_m would round twice more (so LiNeS α = 1, β = 0 is the
    plain method bitwise).
    """
    out = {}
    for name, tau in tau_m.items():
        s = _f32(scale[name] if isinstance(scale, dict) else scale)
        if own is not None and s == 1:
            out[name] = own[name]
            continue
        base32 = base[name].to(F32, copy=True)
        out[name] = base32 if s == 0 else base32 + s * tau
    return out


# ---------------------------------------------------------------------------------------
# The steps a method is composed of (methods.py names them per method)
# ---------------------------------------------------------------------------------------

def _magnitude_keep(xs: list[StateDict], spec: MethodSpec, names: list[str]) -> list[StateDict]:
    """TIES trim: keep |x_i| >= the k_i-th largest over the trim scope."""
    keeps = []
    for x, density in zip(xs, spec.densities):
        if spec.value("rule") == "official":   # over the whole model: floor(rho d) + 1 kept, plus ties
            everything = torch.cat([x[name].flatten() for name in names])
            threshold = kth_largest_abs(everything, official_kept_count(density, everything.numel()))
            thresholds = dict.fromkeys(names, threshold)
        else:
            thresholds = trim_thresholds(x, density, spec.trim_scope, names)
        keeps.append({name: x[name].abs() >= thresholds[name] for name in names})
    return keeps


def _band_keep(xs: list[StateDict], spec: MethodSpec, names: list[str]) -> list[StateDict]:
    """breadcrumbs: per tensor, drop the top gamma_i by magnitude (all ties at the ceiling go) and
    keep the next density_i (all ties at the floor stay)."""
    keeps = []
    for x, density, gamma in zip(xs, spec.densities, spec.gammas):
        keep = {}
        for name in names:
            floor, ceiling = band_thresholds(x[name], density, gamma)
            keep[name] = (x[name].abs() >= floor) & (x[name].abs() < ceiling)
        keeps.append(keep)
    return keeps


def _random_keep(xs: list[StateDict], spec: MethodSpec, names: list[str]) -> list[StateDict]:
    """DARE drop: keep where the Philox draw u >= p_i = float32(1 - density_i)."""
    return [{name: dare_keep(x[name].numel(), d, spec.seed, i, name).view(x[name].shape) for name in names}
            for i, (x, d) in enumerate(zip(xs, spec.densities))]


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probability of each element (float64): per row along dim 1 (a 1-D
    tensor is one row), rank = the count of strictly smaller magnitudes in the row, normalized
    by the row's largest rank (0.5 where every magnitude in the row is equal), then
    density - epsilon + 2 epsilon * normalized rank."""
    if tau.dim() > 2:
        raise MergeInputError(f"della ranks rows of 1-D or 2-D tensors; got shape {tuple(tau.shape)}.")
    if tau.numel() == 0:
        return torch.zeros(tau.shape, dtype=torch.float64)
    rows = tau.abs().reshape(1, -1) if tau.dim() < 2 else tau.abs()
    ranks = torch.searchsorted(torch.sort(rows, dim=1).values, rows.contiguous(), right=False).double()
    top = ranks.max(dim=1, keepdim=True).values
    normalized = torch.where(top > 0, ranks / top.clamp(min=1), 0.5)
    return ((density - epsilon) + normalized * (2 * epsilon)).reshape(tau.shape)


def _ranked_keep(xs: list[StateDict], spec: MethodSpec, names: list[str]) -> list[StateDict]:
    """DELLA: keep where u >= float32(1 - keep probability), u from the DELLA stream (density >= 1:
    everything, as mergekit)."""
    keeps = []
    for i, (x, density, epsilon) in enumerate(zip(xs, spec.densities, spec.value("epsilon"))):
        keep = {}
        for name in names:
            if density >= 1:
                keep[name] = torch.ones_like(x[name], dtype=torch.bool)
                continue
            drop_p = (1 - della_keep_probability(x[name], density, epsilon)).to(F32)
            u = rng.dare_uniform(spec.seed, i, name, x[name].numel(), stream=rng.DELLA_STREAM).view(x[name].shape)
            keep[name] = u >= drop_p
        keeps.append(keep)
    return keeps


SPARSIFIERS = {Sparsify.MAGNITUDE: _magnitude_keep, Sparsify.RANDOM: _random_keep, Sparsify.BAND: _band_keep,
               Sparsify.RANKED: _ranked_keep}


def _sum_consensus(kept: list[torch.Tensor], spec: MethodSpec, zero_sign: float) -> torch.Tensor:
    total = _weighted_sum(kept, spec.weights)
    return total / _f32(sum(spec.weights)) if spec.normalize else total


def _sign_consensus(kept: list[torch.Tensor], spec: MethodSpec, zero_sign: float) -> torch.Tensor:
    return disjoint_merge(kept, spec.weights, elect_sign(kept, spec.weights, zero_sign), spec.normalize)


def _copy_consensus(kept: list[torch.Tensor], spec: MethodSpec, zero_sign: float) -> torch.Tensor:
    """The one input times its weight, one float32 product (no sum from zero: -0.0 stays -0.0)."""
    [x] = kept
    return _f32(spec.weights[0]) * x


CONSENSUS = {Consensus.NONE: _sum_consensus, Consensus.SIGN: _sign_consensus, Consensus.COPY: _copy_consensus}


# -- weights from the inputs' angles (slerp, nuslerp, model_stock), written out per group ------

def _as_groups(x: torch.Tensor, group_by: str) -> tuple[torch.Tensor, int]:
    """x in float64 as [groups, vector length] (group_by as docs/methods.md defines it), and the
    dim of the original layout to restore: 0 for rows, 1 where the groups were columns."""
    flat = x.to(torch.float64).reshape(-1)
    if group_by == "tensor" or x.dim() == 0 or (group_by in ("trailing", "columns") and x.dim() == 1):
        return flat.reshape(1, -1), 0
    if group_by == "leading":
        return flat.reshape(x.shape[0], -1), 0
    if group_by == "trailing":
        return flat.reshape(-1, x.shape[-1]), 0
    return flat.reshape(x.shape[0], -1).T, 1   # columns: vectors along dim 0


def _angle_pair(v0: torch.Tensor, v1: torch.Tensor, t: float, norm_floor: float, replace_small: bool,
                linear_rule) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_0, c_1) per group of [groups, len] vectors: sin((1-t) a) / sin a and sin(t a) / sin a of
    the angle a between the normalized vectors; (1 - t, t) where linear_rule(cos) holds."""
    n0 = torch.linalg.vector_norm(v0, dim=1)
    n1 = torch.linalg.vector_norm(v1, dim=1)
    if replace_small:   # slerp: a norm at or below the floor counts as 1
        n0 = torch.where(n0 > norm_floor, n0, torch.ones_like(n0))
        n1 = torch.where(n1 > norm_floor, n1, torch.ones_like(n1))
    else:               # nuslerp: clamped below at the floor
        n0, n1 = n0.clamp(min=norm_floor), n1.clamp(min=norm_floor)
    cos = ((v0 / n0[:, None]) * (v1 / n1[:, None])).sum(dim=1).clamp(-1, 1)
    linear = linear_rule(cos)
    theta = torch.acos(torch.where(linear, 0.0, cos))
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.where(linear, 1.0, torch.sin(theta)))
    c1 = torch.where(linear, t, torch.sin(t * theta) / torch.where(linear, 1.0, torch.sin(theta)))
    return c0, c1


def _slerp_weights(xs: list[torch.Tensor], spec: MethodSpec) -> list[torch.Tensor]:
    groups = [_as_groups(x, spec.group_by)[0] for x in xs]
    return list(_angle_pair(groups[0], groups[1], spec.value("t"), 1e-8, True, lambda c: c.abs() > 0.9995))


def _nuslerp_weights(xs: list[torch.Tensor], spec: MethodSpec) -> list[torch.Tensor]:
    w0, w1 = spec.weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    groups = [_as_groups(x, spec.group_by)[0] for x in xs]
    return list(_angle_pair(groups[0], groups[1], t, 1e-7, False, lambda c: (1 - c * c) <= 1e-16))


def _model_stock_weights(xs: list[torch.Tensor], spec: MethodSpec) -> list[torch.Tensor]:
    groups = [_as_groups(x, spec.group_by)[0] for x in xs]
    n = len(groups)
    cosines = []
    for a in range(n):
        for b in range(a + 1, n):
            norms = torch.linalg.vector_norm(groups[a], dim=1) * torch.linalg.vector_norm(groups[b], dim=1)
            cosines.append(((groups[a] * groups[b]).sum(dim=1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6   # no finite estimate: keep the base there (t = 0)
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return [t / n] * n


ANGLE_WEIGHTS = {Coefficients.SLERP: _slerp_weights, Coefficients.NUSLERP: _nuslerp_weights,
                 Coefficients.MODEL_STOCK: _model_stock_weights}


def _group_weighted_sum(xs: list[torch.Tensor], spec: MethodSpec) -> torch.Tensor:
    """sum_i c_i[g] x_i in float32, model order from zeros, c_i rounded to float32 per group."""
    if xs[0].numel() == 0:
        return torch.zeros_like(xs[0], dtype=F32)
    coefficients = ANGLE_WEIGHTS[spec.definition.coefficients](xs, spec)
    acc = torch.zeros_like(xs[0], dtype=F32)
    for x, c in zip(xs, coefficients):
        grouped, transposed = _as_groups(x, spec.group_by)
        per_element = c.to(F32)[:, None].expand(grouped.shape)
        per_element = (per_element.T if transposed else per_element).reshape(x.shape)
        acc = acc + per_element * x
    return acc


def tall_mask(taus: list[torch.Tensor], k: int, lams: Sequence[float]) -> torch.Tensor:
    """Consensus merging's mask (TALL masks, https://arxiv.org/abs/2405.07813): model i matters
    where |tau_i| >= lam_i * |S - tau_i|, S = sum_j tau_j (raw task vectors, model order, float32);
    keep the elements where at least k models matter."""
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    count = torch.zeros_like(taus[0], dtype=torch.int32)
    for tau, lam in zip(taus, lams, strict=True):
        count = count + (tau.abs() >= _f32(lam) * (total - tau).abs()).to(torch.int32)
    return count >= k


def _rescaled(x: torch.Tensor, keep: torch.Tensor, rescale: Rescale, density: float) -> torch.Tensor:
    if rescale is Rescale.INVERSE:
        return torch.where(keep, x / _f32(rng.dare_constants(density)[1]), _f32(0.0))
    kept = torch.where(keep, x, _f32(0.0))
    return kept * _f32(l1_rescale_factor(x, keep)) if rescale is Rescale.L1 else kept


def merged_task_vector(base: StateDict | None, models: Sequence[StateDict], spec: MethodSpec,
                       names: Sequence[str] | None = None) -> StateDict:
    """tau_MTL = theta_method - theta_0: the method's merged task vector with lambda = 1.

    Composed from the registry entry: x_i are the task vectors (or, for a soup, the models
    themselves), sparsified and rescaled per model, combined by the consensus step; a soup
    with a base then subtracts theta_0. Without a base (a plain soup) this is the soup
    itself. `names` defaults to every float tensor of the base; global trim statistics run
    over exactly these names.
    """
    method = spec.definition
    reference = base if base is not None else models[0]
    names = _float_names(reference) if names is None else list(names)
    _check_tensors(reference, models, names)
    if spec.inputs is Inputs.DELTAS:
        xs = [task_vectors(base, model, names) for model in models]
    else:
        xs = [{name: model[name].to(F32) for name in names} for model in models]
    if method.coefficients is not Coefficients.GIVEN:
        merged = {name: _group_weighted_sum([x[name] for x in xs], spec) for name in names}
        if spec.inputs is not Inputs.DELTAS and base is not None:
            merged = {name: merged[name] - base[name].to(F32) for name in names}
        return merged
    if method.sparsify is Sparsify.NONE:
        contributions = xs
    else:
        keeps = SPARSIFIERS[method.sparsify](xs, spec, names)
        contributions = [{name: _rescaled(x[name], keep[name], spec.rescale, d) for name in names}
                         for x, keep, d in zip(xs, keeps, spec.densities)]
    combine = CONSENSUS[method.consensus]
    zero_sign = majority_sign(contributions, spec.weights, names) if spec.value("rule") == "official" else 1.0
    merged = {name: combine([c[name] for c in contributions], spec, zero_sign) for name in names}
    if spec.tall is not None:
        k, lam = spec.tall
        merged = {name: torch.where(tall_mask([x[name] for x in xs], k, lam), merged[name], _f32(0.0))
                  for name in names}
    if spec.inputs is not Inputs.DELTAS and base is not None:
        merged = {name: merged[name] - base[name].to(F32) for name in names}
    return merged


# ---------------------------------------------------------------------------------------
# LiNeS
# ---------------------------------------------------------------------------------------

def lines_auto_alpha(base: StateDict, models: Sequence[StateDict], tau_mtl: StateDict,
                     finetuned: int | None = None) -> float:
    """alpha = (1/N) * ||sum_i tau_i||_1 / ||tau_MTL||_1 over the tensors of tau_mtl.

    N = finetuned: the fine-tuned models among `models` (default all of them); a base among
    the inputs (slerp, linear with a base weight) adds tau = 0 to the sum but is not counted.

    sum_i tau_i is untrimmed and unweighted (the official code), summed in float32 in model
    order; the L1 norms are accumulated in float64.
    """
    sum_l1 = 0.0
    mtl_l1 = 0.0
    for name, tau_m in tau_mtl.items():
        total = torch.zeros_like(tau_m)
        for model in models:
            total = total + (model[name].to(F32) - base[name].to(F32))
        sum_l1 += total.double().abs().sum().item()
        mtl_l1 += tau_m.double().abs().sum().item()
    if mtl_l1 == 0:
        raise MergeInputError(
            "LiNeS alpha 'auto' divides by the L1 norm of the merged task vector, and it is 0 "
            "(the models equal the base, or everything was trimmed or dropped). Give alpha explicitly."
        )
    return sum_l1 / mtl_l1 / (len(models) if finetuned is None else finetuned)


def _lines_scale_map(
    lines: LinesSpec, base: StateDict, models: Sequence[StateDict], tau_mtl: StateDict, finetuned: int
) -> dict[str, float]:
    alpha = lines.alpha
    if alpha == "auto":
        alpha = lines_auto_alpha(base, models, tau_mtl, finetuned)
    elif isinstance(alpha, str):
        raise MergeInputError(f"LiNeS alpha must be a number or 'auto', got {alpha!r}.")
    return lines_scales(list(tau_mtl), alpha, lines.beta, outside=lines.outside, layer_pattern=lines.layer_pattern)


def lines_edit(
    base: StateDict, model: StateDict, gamma: float, outside: str = "alpha", layer_pattern: str | None = None
) -> StateDict:
    """Single-model LiNeS (the paper's gamma form): theta0 + (gamma + (1 - gamma) * l / (L - 1)) * tau_1.

    Returns the whole state dict in the base's dtypes, like merge_state_dicts.
    """
    spec = LinesSpec(alpha=gamma, beta=1.0 - gamma, outside=outside, layer_pattern=layer_pattern)
    return merge_state_dicts(base, [model], "task_arithmetic", lines=spec)


# ---------------------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------------------

_ALIASES = {"weights": "weight", "lam": "lambda", "densities": "density"}


def spec_from_params(method: str, n_models: int, lines: LinesSpec | None = None, with_base: bool = True,
                     **params) -> MethodSpec:
    """make_spec with Python-friendly aliases: weights= for weight, lam= for lambda."""
    values = {}
    for key, value in params.items():
        name = _ALIASES.get(key, key)
        if name in values:
            raise TypeError(f"{key} given twice (as {name} and an alias)")
        if value is not None:
            values[name] = list(value) if isinstance(value, (list, tuple)) else value
    return make_spec(method, n_models, values=values, lines=lines, with_base=with_base)


def merge_state_dicts(
    base: StateDict | None,
    models: list[StateDict],
    method: str,
    *,
    lines: LinesSpec | None = None,
    exclude: list[str] | None = None,
    out_dtype: torch.dtype | None = None,
    base_weight: float | None = None,
    **params,
) -> StateDict:
    """Merge whole state dicts; returns every tensor of the base (first model for baseless linear).

    params: the method's parameters by their config names (weight, density, lambda,
    normalize, rescale, trim_scope, seed), with weights= and lam= as aliases; a parameter the
    method does not take is an error. Merged tensors are cast to out_dtype, default their own
    dtype in the base. Non-float and excluded tensors are copied unchanged. With `lines`, the
    LiNeS scale replaces lambda and a base is required, for linear too. base_weight (linear
    only): the base is averaged in as the first model with this weight, as mergekit does.
    """
    if not models:
        raise MergeInputError("No fine-tuned models given: a merge needs at least one.")
    if base_weight is not None:
        if base is None:
            raise MergeInputError("base_weight needs a base model.")
        weights = params.pop("weights", params.pop("weight", None))
        weights = [1.0] * len(models) if weights is None else (
            list(weights) if isinstance(weights, (list, tuple)) else [weights] * len(models))
        models = [base, *models]
        params["weight"] = [base_weight, *weights]
    from .methods import get

    if get(method).inputs is Inputs.BASE_AND_MODELS:   # slerp: the base is the first input
        if base is None:
            raise MergeInputError(f"{method} needs a base model: it is the first of the models it interpolates.")
        models = [base, *models]
    spec = spec_from_params(method, len(models), lines=lines, with_base=base is not None, **params)
    if base_weight is not None and spec.definition.inputs is not Inputs.MODELS:
        raise MergeInputError(f"base_weight averages the base in; {method} works on task vectors from it.")
    return merge_with_spec(base, models, spec, exclude=exclude, out_dtype=out_dtype,
                           finetuned=len(models) - 1 if base_weight is not None else None)


def merge_with_spec(base: StateDict | None, models: list[StateDict], spec: MethodSpec, *,
                    exclude: list[str] | None = None, out_dtype: torch.dtype | None = None,
                    finetuned: int | None = None) -> StateDict:
    """merge_state_dicts for an already validated MethodSpec (models: the spec's inputs, in
    order). finetuned: how many of them are fine-tuned models, N of LiNeS α auto (default
    spec.finetuned_inputs; linear with an averaged-in base: one fewer than the inputs)."""
    if base is None and spec.uses_base:
        needs = "LiNeS" if spec.inputs is Inputs.MODELS else f"method {spec.method}"
        raise MergeInputError(f"{needs} needs a base model (theta0); none was given.")
    reference = models[0] if base is None else base
    names = _merged_names(reference, exclude)
    if not spec.uses_base:
        merged = merged_task_vector(None, models, spec, names)  # a plain soup is its own result
    else:
        own = None   # a soup's own result θ_method (LiNeS on a method whose result is a model)
        if spec.inputs is Inputs.DELTAS:
            tau_mtl = merged_task_vector(base, models, spec, names)
        else:
            own = merged_task_vector(None, models, spec, names)
            tau_mtl = {name: own[name] - base[name].to(F32) for name in names}
        lines = spec.lines
        n = spec.finetuned_inputs if finetuned is None else finetuned
        scale = _lines_scale_map(lines, base, models, tau_mtl, n) if lines is not None else spec.lam
        merged = apply_task_vector(base, tau_mtl, scale, own)
    return {
        name: merged[name].to(out_dtype or tensor.dtype) if name in merged else tensor.clone()
        for name, tensor in reference.items()
    }
