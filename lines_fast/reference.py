"""The pure-PyTorch reference of every merge method in shared/SEMANTICS.md.

Written to be read and trusted, not to be fast: whole state dicts in memory, every step a
separate float32 tensor operation in the order SEMANTICS.md writes it. Every backend is
tested against this module, and its building blocks (thresholds, signs, DARE masks) are the
exact values a fast path must reproduce.

Summation order is part of the contract, because float32 addition is not associative:
every sum over models runs i = 0..N-1 as `acc = acc + w_i * x_i`, starting from zeros, with
w_i a float32 scalar. The final step is theta = theta0 + scale * tau_m as two float32
operations (multiply, then add), then one cast to the output dtype (round-to-nearest-even).

Layout: building blocks (task vectors, trim, election, disjoint merge, DARE drop), then
`merged_task_vector` (tau_MTL, the method's merged task vector with lambda = 1), then one
public function per method, then LiNeS, then `merge_state_dicts`, the dispatcher used by
the engine and the tests. The per-method functions return float32 tensors for the merged
tensors only; `merge_state_dicts` adds the copied tensors and casts.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from . import rng
from .errors import MergeInputError
from .layers import lines_scales
from .spec import METHODS, TRIM_SCOPES, LinesSpec, default_lambda, kept_count

StateDict = dict[str, torch.Tensor]
F32 = torch.float32
# Methods whose merged task vector is built from per-model densities.
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")


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


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeInputError(f"Got {len(weights)} weights for {n} models; give one per model.")
    return weights


def _weight_total(weights: Sequence[float]) -> torch.Tensor:
    """sum(w) as a Python (double) sum, then float32: the divisor of normalized linear merges."""
    total = sum(weights)
    if total == 0:
        raise MergeInputError(
            f"The weights {list(weights)} sum to 0, and this merge divides by their sum. "
            "Change the weights or set normalize: false."
        )
    return _f32(total)


def _densities(density: float | Sequence[float] | None, n: int, method: str) -> list[float]:
    if density is None:
        raise MergeInputError(f"Method {method} needs a density in (0, 1] (a number or one per model).")
    densities = [float(d) for d in density] if isinstance(density, (list, tuple)) else [float(density)] * n
    if len(densities) != n:
        raise MergeInputError(f"Got {len(densities)} densities for {n} models; give one, or one per model.")
    for d in densities:
        if not 0.0 < d <= 1.0:  # also rejects NaN
            raise MergeInputError(f"density {d} is outside (0, 1]: it is the fraction of each task vector kept.")
    return densities


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed <= rng.MAX_SEED:
        raise MergeInputError(f"seed must be an integer in [0, 2^63), got {seed!r}.")


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def task_vectors(base: StateDict, model: StateDict, names: Sequence[str] | None = None) -> StateDict:
    """tau = float32(model) - float32(base) for `names` (default: every float tensor of base)."""
    names = _float_names(base) if names is None else names
    return {name: model[name].to(F32) - base[name].to(F32) for name in names}


def _kth_largest_abs(values: torch.Tensor, density: float) -> float:
    """The k-th largest |value|, k = kept_count(density, numel); inf (keep nothing) when k = 0."""
    magnitudes = values.flatten().abs()
    d = magnitudes.numel()
    k = kept_count(density, d)
    if k == 0:
        return math.inf
    # The k-th largest of d values is the (d - k + 1)-th smallest.
    return torch.kthvalue(magnitudes, d - k + 1).values.item()


def trim_thresholds(
    task_vectors_of_model: StateDict, density: float, scope: str, names: Sequence[str] | None = None
) -> dict[str, float]:
    """TIES step 1 thresholds t (keep |tau| >= t) for one model, per tensor name.

    scope "tensor": one threshold per tensor, d = its numel. scope "global": one threshold
    over all `names` together (d = their total numel), repeated for each name. Values are
    float32 numbers held as Python floats; float('inf') means k = 0.
    """
    names = list(task_vectors_of_model) if names is None else list(names)
    if scope == "tensor":
        return {name: _kth_largest_abs(task_vectors_of_model[name], density) for name in names}
    if scope == "global":
        if not names:
            return {}
        everything = torch.cat([task_vectors_of_model[name].flatten() for name in names])
        return dict.fromkeys(names, _kth_largest_abs(everything, density))
    raise MergeInputError(f"trim_scope {scope!r} is not one of {', '.join(TRIM_SCOPES)}.")


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep tau where |tau| >= threshold (all ties at the threshold kept), else 0."""
    return torch.where(tau.abs() >= threshold, tau, _f32(0.0))


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * x_i in float32, in model order, starting from zeros."""
    acc = torch.zeros_like(tensors[0], dtype=F32)
    for x, w in zip(tensors, weights):
        acc = acc + _f32(w) * x
    return acc


def elect_sign(trimmed: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES step 2: gamma = sign(sum_i w_i * tau_hat_i), +1 where the sum is 0 (incl. -0.0).

    Returned as a float32 tensor of +1.0 / -1.0.
    """
    total = _weighted_sum(trimmed, weights)
    return torch.where(total >= 0, _f32(1.0), _f32(-1.0))


def disjoint_merge(
    trimmed: Sequence[torch.Tensor], weights: Sequence[float], gamma: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """TIES step 3: the weighted mean over the agreeing models A (0 where A is empty).

    A = {i : tau_hat_i != 0 and sign(tau_hat_i) == gamma}. Without normalize, the weighted
    sum over A. Numerator and denominator are summed in model order like every other sum.
    """
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    any_agree = torch.zeros_like(gamma, dtype=torch.bool)
    for tau_hat, w in zip(trimmed, weights):
        agree = (tau_hat != 0) & (torch.sign(tau_hat) == gamma)
        numerator = numerator + torch.where(agree, _f32(w) * tau_hat, _f32(0.0))
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


def _sign_elected_merge(trimmed: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES steps 2-3 on already trimmed (or DARE-dropped) task vectors."""
    return disjoint_merge(trimmed, weights, elect_sign(trimmed, weights), normalize)


def dare_drop(tau: torch.Tensor, density: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """DARE: keep tau[j] / divisor where u(seed, model_index, name, j) >= p, else 0.

    p and divisor = float32(1 - p) come from rng.dare_constants; u from rng.dare_uniform
    over the tensor's flat (row-major) indices, so the mask depends on nothing else.
    """
    p, divisor = rng.dare_constants(density)
    u = rng.dare_uniform(seed, model_index, name, tau.numel()).view(tau.shape)
    return torch.where(u >= p, tau / _f32(divisor), _f32(0.0))


def apply_task_vector(base: StateDict, tau_m: StateDict, scale: float | dict[str, float]) -> StateDict:
    """theta = float32(base) + scale * tau_m per tensor (multiply, then add, in float32).

    `scale` is lambda, or a per-name dict (LiNeS). A zero scale returns float32(base)
    exactly: base + 0 * tau would turn a -0.0 of the base into +0.0, and SEMANTICS.md
    promises that wise_ft with a = 0 returns the base bitwise.
    """
    out = {}
    for name, tau in tau_m.items():
        s = _f32(scale[name] if isinstance(scale, dict) else scale)
        base32 = base[name].to(F32, copy=True)
        out[name] = base32 if s == 0 else base32 + s * tau
    return out


# ---------------------------------------------------------------------------------------
# The merged task vector of each method (lambda = 1)
# ---------------------------------------------------------------------------------------

def merged_task_vector(
    base: StateDict,
    models: Sequence[StateDict],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    normalize: bool = True,
    trim_scope: str = "tensor",
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> StateDict:
    """tau_MTL: the merged task vector of `method` with lambda = 1, float32, for `names`.

    This is what lambda (or the LiNeS scale) multiplies. linear: sum w_i tau_i / sum w_i
    (just the weighted sum without normalize); wise_ft: tau_1; task_arithmetic:
    sum w_i tau_i; ties: trim, elect, disjoint merge; dare_linear: sum w_i tau~_i;
    dare_ties: elect and disjoint merge of tau~. `names` defaults to every float tensor of
    the base; global trim statistics run over exactly these names.
    """
    if method not in METHODS:
        raise MergeInputError(f"Unknown merge method {method!r}; choose one of {', '.join(METHODS)}.")
    names = _float_names(base) if names is None else list(names)
    _check_tensors(base, models, names)
    n = len(models)
    if method == "wise_ft" and n != 1:
        raise MergeInputError(f"wise_ft mixes the base with exactly one fine-tuned model, got {n}.")
    w = _weights(weights, n)
    densities = _densities(density, n, method) if method in _DENSITY_METHODS else None
    taus = [task_vectors(base, model, names) for model in models]

    if method == "linear":
        divisor = _weight_total(w) if normalize else None
        merged = {name: _weighted_sum([tau[name] for tau in taus], w) for name in names}
        return merged if divisor is None else {name: t / divisor for name, t in merged.items()}
    if method == "wise_ft":
        return taus[0]
    if method == "task_arithmetic":
        return {name: _weighted_sum([tau[name] for tau in taus], w) for name in names}
    if method == "ties":
        if trim_scope not in TRIM_SCOPES:
            raise MergeInputError(f"trim_scope {trim_scope!r} is not one of {', '.join(TRIM_SCOPES)}.")
        trimmed = []
        for tau, d in zip(taus, densities):
            thresholds = trim_thresholds(tau, d, trim_scope, names)
            trimmed.append({name: trim(tau[name], thresholds[name]) for name in names})
        return {name: _sign_elected_merge([t[name] for t in trimmed], w, normalize) for name in names}

    # dare_linear / dare_ties
    _check_seed(seed)
    dropped = [
        {name: dare_drop(tau[name], d, seed, i, name) for name in names}
        for i, (tau, d) in enumerate(zip(taus, densities))
    ]
    if method == "dare_linear":
        return {name: _weighted_sum([t[name] for t in dropped], w) for name in names}
    return {name: _sign_elected_merge([t[name] for t in dropped], w, normalize) for name in names}


# ---------------------------------------------------------------------------------------
# One function per method: float32 results for the merged tensors
# ---------------------------------------------------------------------------------------

def linear(
    models: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    *,
    names: Sequence[str] | None = None,
) -> StateDict:
    """Model soup: sum_i w_i theta_i / sum w_i (no division without normalize); no base.

    `names` defaults to every float tensor of the first model.
    """
    if not models:
        raise MergeInputError("No models given: a merge needs at least one.")
    names = _float_names(models[0]) if names is None else list(names)
    _check_tensors(models[0], models, names)
    w = _weights(weights, len(models))
    divisor = _weight_total(w) if normalize else None
    out = {}
    for name in names:
        total = _weighted_sum([model[name].to(F32) for model in models], w)
        out[name] = total if divisor is None else total / divisor
    return out


def wise_ft(base: StateDict, model: StateDict, a: float, *, names: Sequence[str] | None = None) -> StateDict:
    """WiSE-FT: theta0 + a * tau_1 (a = 0 gives the base bitwise)."""
    return apply_task_vector(base, merged_task_vector(base, [model], "wise_ft", names=names), a)


def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    *,
    names: Sequence[str] | None = None,
) -> StateDict:
    """theta0 + lam * sum_i w_i tau_i."""
    tau_m = merged_task_vector(base, models, "task_arithmetic", weights=weights, names=names)
    return apply_task_vector(base, tau_m, lam)


def ties(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    lam: float = 1.0,
    normalize: bool = True,
    trim_scope: str = "tensor",
    names: Sequence[str] | None = None,
) -> StateDict:
    """TIES: trim each tau_i to its top density by magnitude, elect signs, disjoint mean."""
    tau_m = merged_task_vector(
        base, models, "ties", weights=weights, density=density, normalize=normalize,
        trim_scope=trim_scope, names=names,
    )
    return apply_task_vector(base, tau_m, lam)


def dare_linear(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    lam: float = 1.0,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> StateDict:
    """DARE then task arithmetic: theta0 + lam * sum_i w_i tau~_i."""
    tau_m = merged_task_vector(base, models, "dare_linear", weights=weights, density=density, seed=seed, names=names)
    return apply_task_vector(base, tau_m, lam)


def dare_ties(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    lam: float = 1.0,
    normalize: bool = True,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> StateDict:
    """DARE then TIES steps 2-4 (no magnitude trim)."""
    tau_m = merged_task_vector(
        base, models, "dare_ties", weights=weights, density=density, normalize=normalize, seed=seed, names=names,
    )
    return apply_task_vector(base, tau_m, lam)


# ---------------------------------------------------------------------------------------
# LiNeS
# ---------------------------------------------------------------------------------------

def lines_auto_alpha(base: StateDict, models: Sequence[StateDict], tau_mtl: StateDict) -> float:
    """alpha = (1/N) * ||sum_i tau_i||_1 / ||tau_MTL||_1 over the tensors of tau_mtl.

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
    return sum_l1 / mtl_l1 / len(models)


def _lines_scale_map(
    lines: LinesSpec, base: StateDict, models: Sequence[StateDict], tau_mtl: StateDict
) -> dict[str, float]:
    alpha = lines.alpha
    if alpha == "auto":
        alpha = lines_auto_alpha(base, models, tau_mtl)
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

def merge_state_dicts(
    base: StateDict | None,
    models: list[StateDict],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    lam: float | None = None,
    normalize: bool = True,
    trim_scope: str = "tensor",
    seed: int = 0,
    lines: LinesSpec | None = None,
    exclude: list[str] | None = None,
    out_dtype: torch.dtype | None = None,
    **aliases: float,
) -> StateDict:
    """Merge whole state dicts; returns every tensor of the base (first model for baseless linear).

    Merged tensors are cast to out_dtype, default their own dtype in the base. Non-float and
    excluded tensors are copied unchanged. `lam` None means spec.default_lambda(method)
    (wise_ft's a); `lambda=` is accepted as an alias. With `lines`, the LiNeS scale
    replaces lam and a base is required, for linear too.
    """
    if set(aliases) - {"lambda"}:
        raise TypeError(f"merge_state_dicts() got unexpected keyword arguments {sorted(set(aliases) - {'lambda'})}")
    if "lambda" in aliases:
        if lam is not None:
            raise TypeError("give lam or lambda, not both")
        lam = aliases["lambda"]
    if method not in METHODS:
        raise MergeInputError(f"Unknown merge method {method!r}; choose one of {', '.join(METHODS)}.")
    if not models:
        raise MergeInputError("No fine-tuned models given: a merge needs at least one.")
    soup = method == "linear" and lines is None
    if base is None and not soup:
        needs = "LiNeS" if method == "linear" else f"method {method}"
        raise MergeInputError(f"{needs} needs a base model (theta0); none was given.")

    reference = models[0] if base is None else base
    names = _merged_names(reference, exclude)
    if soup:
        merged = linear(models, weights, normalize, names=names)
    else:
        tau_mtl = merged_task_vector(
            base, models, method, weights=weights, density=density, normalize=normalize,
            trim_scope=trim_scope, seed=seed, names=names,
        )
        if lines is not None:
            scale = _lines_scale_map(lines, base, models, tau_mtl)
        else:
            scale = default_lambda(method) if lam is None else lam
        merged = apply_task_vector(base, tau_mtl, scale)

    return {
        name: merged[name].to(out_dtype or tensor.dtype) if name in merged else tensor.clone()
        for name, tensor in reference.items()
    }
