"""The per-element plan: what both backends (CPU and Triton) execute for every element.

`ElementPlan.from_spec` turns a method's composition (lines_fast/methods.py) and its
resolved parameters into switches and per-model numbers; a backend executes the plan and
never reads a method's name. Per element, all float32, models in config order:

    x_i    = f32(theta_i) - f32(theta_0)    deltas (task-vector methods)
           = f32(theta_i)                   a soup (Inputs.MODELS)
    sparsify: MAGNITUDE keeps |x_i| >= t_i; RANDOM keeps u_i >= p_i (Philox, lines_fast/rng.py);
              BAND keeps t_i <= |x_i| < c_i (the ceiling c_i drops the largest outliers)
    rescale:  INVERSE divides the kept values by q_i; L1 multiplies them by f_i (per tensor)
    c_i    = w_i * x_i
    (Gram weights: w_i is w_i[g], the weight of the element's group g, from the inputs' norms
     and dot products: lines_fast/gram.py; x_0 is theta_0 where the base is an input)
    consensus NONE: tau_m = sum_i c_i, from +0   [/ W with normalize, W = f32(sum_i w_i)]
    consensus COPY: tau_m = c_0, the one input's product (a sum from -0.0, the identity of IEEE
                    addition, so a -0.0 stays -0.0)
    consensus SIGN: gamma = sign(sum_i c_i) (at 0: +1, or the official rule's majority sign);
                    A = {i : c_i != 0, sign(c_i) = gamma}
                    tau_m = sum_{i in A} c_i     [/ sum_{i in A} w_i with normalize; 0 if A empty]
    consensus mask (TALL, tall_k > 0): tau_m = tau_m where #{i : |tau_i| >= lam_i * |S - tau_i|} >= k,
                    else +0 (S = sum_j tau_j, the raw task vectors, in model order)
    a soup with a base (LiNeS): tau_m = tau_m - f32(theta_0)   (not at s == 1: at_scale)
    out    = theta_0 + s * tau_m  (s: lambda or the LiNeS scale; theta_0 bitwise where s == 0)
           = tau_m                a soup without a base

Per-tensor statistics (`TensorStats`) are numbers a backend finds before merging a tensor,
or that the engine found in a statistics pass (global thresholds): the trim thresholds t_i
and the L1 rescale factors f_i. They are returned to the caller, never stored on a job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from .lazy import torch

from . import jit, rng
from . import gram as gram_stats
from .errors import MergeInputError
from .methods import Coefficients, Consensus, Inputs, Rescale, Sparsify
from .spec import MethodSpec, band_ranks, kept_count, official_kept_count

# jit_kernels.della_drop_p's array it does not write in a call (the probabilities, or the keep mask).
_NO_P, _NO_KEEP = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint8)

# mergekit's floor below which an L1 norm is treated as zero (no rescale then).
RESCALE_EPS = 1e-7
TABLE_ROWS = ("weights", "thresholds", "drop_p", "divisors", "factors", "ceilings", "tall_lambdas")


def f32(x: float) -> float:
    """x rounded to float32 (nearest even), as a Python float."""
    return float(np.float32(x))


def rescale_factor(total_l1: float, kept_l1: float) -> float:
    """f = float32(||tau||_1 / ||kept tau||_1), or 1 where either norm is below RESCALE_EPS."""
    if total_l1 < RESCALE_EPS or kept_l1 < RESCALE_EPS:
        return 1.0
    return f32(total_l1 / kept_l1)


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor numbers the merge of one tensor needs, one per model: trim thresholds
    (keep |x_i| >= t_i; inf keeps nothing), the band's ceilings, and L1 rescale factors. None
    where not needed or not yet found."""

    thresholds: tuple[float, ...] | None = None
    factors: tuple[float, ...] | None = None
    ceilings: tuple[float, ...] | None = None   # BAND: drop |x_i| >= c_i (inf drops nothing)
    group_weights: torch.Tensor | None = None   # Gram weights: float32 CPU [N, groups]
    zero_sign: float | None = None   # the elected sign where the sign sum is 0 (official TIES: the majority's)


@dataclass(frozen=True)
class ElementPlan:
    n_models: int
    uses_base: bool           # theta_0 is read
    deltas: bool              # x_i = theta_i - theta_0 (else the models themselves)
    sparsify: Sparsify
    rescale: Rescale
    consensus: Consensus
    normalize: bool
    threshold_scope: str      # "tensor" or "global" (MAGNITUDE only)
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]   # BAND: the fraction of top magnitudes dropped
    epsilons: tuple[float, ...]  # RANKED: DELLA's spread of keep probabilities
    drop_p: tuple[float, ...]
    divisors: tuple[float, ...]
    seed: int = 0
    weight_sum: float = 1.0   # f32(sum_i w_i), the divisor of a normalized sum
    coefficients: Coefficients = Coefficients.GIVEN
    group_by: str | None = None   # Gram weights: the element groups (gram.group_view)
    t: float = 0.5                # slerp / nuslerp: the interpolation point
    tall_k: int = 0               # consensus (TALL) mask: keep where >= k models matter; 0 = off
    tall_lambdas: tuple[float, ...] = ()   # ... where model i matters if |tau_i| >= lambda_i * |sum_j tau_j - tau_i|
    official: bool = False        # the official TIES code's rule: floor(rho d) + 1 kept, majority sign at 0

    @classmethod
    def from_spec(cls, spec: MethodSpec) -> "ElementPlan":
        method = spec.definition
        n = spec.n_models
        weights = spec.weights
        rescale = spec.rescale if method.sparsify is not Sparsify.NONE else Rescale.NONE
        random = method.sparsify is Sparsify.RANDOM
        consts = [rng.dare_constants(d) for d in spec.densities] if random else [(0.0, 1.0)] * n
        sum_normalize = spec.normalize and method.consensus is Consensus.NONE
        if method.coefficients is Coefficients.NUSLERP:   # mergekit: t = w_1 / (w_0 + w_1), 0.5 at a zero sum
            total = sum(weights)
            t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        else:
            t = spec.value("t", 0.5)
        return cls(
            n_models=n, uses_base=spec.uses_base, deltas=spec.inputs is Inputs.DELTAS,
            sparsify=method.sparsify, rescale=rescale, consensus=method.consensus, normalize=spec.normalize,
            threshold_scope=spec.trim_scope if method.sparsify is Sparsify.MAGNITUDE else "tensor",
            weights=tuple(f32(w) for w in weights), densities=tuple(spec.densities), gammas=tuple(spec.gammas),
            epsilons=tuple(spec.value("epsilon", (0.0,) * n)),
            drop_p=tuple(p for p, _ in consts),
            divisors=tuple(dv for _, dv in consts) if rescale is Rescale.INVERSE else (1.0,) * n,
            seed=int(spec.seed), weight_sum=f32(sum(weights)) if sum_normalize else 1.0,
            coefficients=method.coefficients, group_by=spec.group_by, t=t,
            tall_k=spec.tall[0] if spec.tall else 0,
            tall_lambdas=tuple(f32(v) for v in spec.tall[1]) if spec.tall else (0.0,) * n,
            official=spec.value("rule") == "official")

    @classmethod
    def task_vector_sum(cls, n_models: int) -> "ElementPlan":
        """sum_i tau_i, unsparsified and unweighted (w = 1 multiplies exactly): for ||sum tau||_1."""
        ones = (1.0,) * n_models
        return cls(n_models=n_models, uses_base=True, deltas=True, sparsify=Sparsify.NONE, rescale=Rescale.NONE,
                   consensus=Consensus.NONE, normalize=False, threshold_scope="tensor", weights=ones,
                   densities=ones, gammas=(0.0,) * n_models, epsilons=(0.0,) * n_models, drop_p=(0.0,) * n_models, divisors=ones)

    def at_scale(self, scale: float) -> "ElementPlan":
        """The plan that merges a tensor whose scale s (λ, or its LiNeS λ(ℓ)) is `scale`: this one,
        except a soup with a base (LiNeS on a method whose result is a model) at s == 1, where
        θ0 + 1·(θ_method − θ0) is θ_method itself: there the soup's own plan (no base), so
        LiNeS α = 1, β = 0 gives the plain method bitwise, not rounded twice more. s is compared
        as the float32 the kernels multiply by (a LiNeS scale of 1 + 2^-52 is 1 there)."""
        if f32(scale) == 1.0 and self.uses_base and not self.deltas:   # the kernels' float32 s
            return replace(self, uses_base=False)
        return self

    # -- the statistics a tensor's merge needs ---------------------------------------------
    @property
    def trims(self) -> bool:
        """Magnitude thresholds are needed (TIES's trim, breadcrumbs' band)."""
        return self.sparsify in (Sparsify.MAGNITUDE, Sparsify.BAND)

    @property
    def band(self) -> bool:
        return self.sparsify is Sparsify.BAND

    @property
    def ranked(self) -> bool:
        return self.sparsify is Sparsify.RANKED

    def rank_row_len(self, shape, name: str) -> int:
        """DELLA ranks magnitudes along dim 1 (a 1-D tensor is one row): the row length. Rows are
        contiguous for 1-D and 2-D tensors, the only ones taken."""
        if len(shape) > 2:
            raise MergeInputError(f"tensor {name!r} has shape {tuple(shape)}: della ranks each row of a 1-D or 2-D "
                                  "tensor (along dim 1), and tensors of 3 or more dims are not supported; exclude "
                                  "it (exclude: REGEX) or use another method.")
        return max(1, int(shape[-1])) if len(shape) else 1

    def ranked_drop_p(self, rows: torch.Tensor, i: int, compiled: bool = True) -> torch.Tensor:
        """DELLA's drop probability of each element of whole rows [R, L] of model i's x (float32):
        1 - keep with keep = (density - eps) + 2 eps * rank / max rank in the row, rank = how many
        magnitudes in the row are strictly smaller (no dependence on sort order; 0.5 for a row
        of equal magnitudes), in double, rounded once to float32. density >= 1 drops nothing.
        compiled=False: the torch code (the kernel declined these rows already)."""
        density, eps = self.densities[i], self.epsilons[i]
        if density >= 1:
            return torch.zeros_like(rows)
        fast = jit.compiled(rows.numel()) if compiled and rows.device.type == "cpu" else None
        if fast is not None:   # compiled (lines_fast/jit.py), the same bits; Inf or NaN: the torch code below
            out = torch.empty(rows.shape, dtype=torch.float32)
            if fast.della_drop_p(rows.contiguous().numpy(), float(density), float(eps), out.numpy(), _NO_KEEP,
                                 False, 0, 0, 0, 0, 0):
                return out
        magnitudes = rows.abs()
        # rank = the sorted position of the first equal magnitude: a running max of the positions
        # where the sorted value changes, scattered back to where each magnitude came from (the
        # same counts a searchsorted gives, in O(L) after the sort instead of O(L log L)).
        ordered, order = torch.sort(magnitudes, dim=1)
        positions = torch.arange(ordered.shape[1], device=rows.device).expand_as(ordered)
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        first = torch.cummax(torch.where(starts, positions, 0), dim=1).values
        rank = torch.empty_like(first).scatter_(1, order, first).to(torch.float64)
        top = rank.max(dim=1, keepdim=True).values
        normalized = torch.where(top > 0, rank / torch.where(top > 0, top, 1.0), 0.5)
        keep = (density - eps) + normalized * (2 * eps)
        return (1 - keep).to(torch.float32)

    def magnitude_ranks(self, d: int) -> list[tuple[int, ...]]:
        """Per model, the ranks k (from the top) of the |x_i| to find over a scope of d elements:
        (k_floor,) for a trim, (k_floor, k_ceiling) for a band. k = 0 gives threshold inf."""
        if self.band:
            return [band_ranks(density, gamma, d) for density, gamma in zip(self.densities, self.gammas)]
        count = official_kept_count if self.official else kept_count
        return [(count(density, d),) for density in self.densities]

    def zero_sign(self, stats: TensorStats | None) -> float:
        """gamma where the election sum is 0: +1, or the model-wide majority sign (official rule)."""
        if not self.official:
            return 1.0
        if stats is None or stats.zero_sign is None:
            raise ValueError("the official TIES rule needs the majority sign from the engine's signs pass")
        return stats.zero_sign

    def stats_from_thresholds(self, found: list[tuple[float, ...]], stats: TensorStats | None = None) -> TensorStats:
        """`stats` (default: none) with the thresholds of magnitude_ranks' ranks, in that order."""
        return replace(stats or TensorStats(), thresholds=tuple(t[0] for t in found),
                       ceilings=tuple(t[1] for t in found) if self.band else None)

    @property
    def copies_input(self) -> bool:
        """The output is the one input itself, bitwise (consensus COPY at weight 1: -0.0 + 1 * x is
        x, whatever x): a backend may hand the values of an input whose dtype float32 holds
        exactly (bf16, fp16, fp32) on without the float32 round trip, the output dtype's cast
        rounding each as the merge would. (Under --allow-nonfinite a NaN then keeps its payload
        bits, as mergekit's copy keeps them; the float32 arithmetic makes every NaN one pattern.)"""
        return (self.consensus is Consensus.COPY and self.weights == (1.0,) and not self.uses_base
                and not self.deltas and self.sparsify is Sparsify.NONE and self.rescale is Rescale.NONE
                and not self.normalize and not self.tall_k)

    @property
    def drops(self) -> bool:
        """Whether elements are dropped by Philox draws (DARE, DELLA): the kernels keep its state
        per element, and launch more warps for it."""
        return self.sparsify in (Sparsify.RANDOM, Sparsify.RANKED)

    @property
    def global_thresholds(self) -> bool:
        return self.trims and self.threshold_scope == "global"

    @property
    def grouped(self) -> bool:
        """The weights come per group from a Gram statistic (not the given weights)."""
        return self.coefficients is not Coefficients.GIVEN

    @property
    def elementwise(self) -> bool:
        """Each output element depends only on the same element of the inputs and on numbers
        shared by every tensor: no per-tensor statistic (tensor-scope thresholds, L1 factors, Gram
        weights) and no draw keyed by the tensor's name and position. Then tensors may be merged
        packed end to end, to the same bits (the engine packs small ones)."""
        return (not self.drops and not self.grouped and self.rescale is not Rescale.L1
                and not (self.trims and self.threshold_scope == "tensor"))

    @property
    def segment_packable(self) -> bool:
        """Elementwise but for per-tensor numbers: tensor-scope thresholds (TIES, breadcrumbs), DARE's
        draws keyed by the tensor's name and its L1 rescale factors. Equal-sized tensors may then be
        packed with those numbers per tensor (MergeJob.segments), to the same bits."""
        thresholds = self.trims and self.threshold_scope == "tensor" and self.rescale is not Rescale.L1
        return (thresholds or self.sparsify is Sparsify.RANDOM) and not self.grouped and not self.official

    def missing(self, stats: TensorStats | None) -> tuple[bool, bool, bool]:
        """(needs thresholds, needs factors, needs group weights) that `stats` does not have yet."""
        stats = stats or TensorStats()
        return (self.trims and stats.thresholds is None,
                self.rescale is Rescale.L1 and stats.factors is None,
                self.grouped and stats.group_weights is None)

    def keep_masks(self, x: torch.Tensor, i: int, stats: TensorStats, name: str, start: int,
                   row_len: int | None = None) -> torch.Tensor:
        """The bool keep mask of model i's values x (flat, elements start.. of tensor `name`):
        the sparsifier's rule, in plain torch (for the statistics; backends fuse it). RANKED:
        x holds whole rows of row_len elements."""
        if self.sparsify is Sparsify.RANKED:
            if self.densities[i] >= 1:   # p = 0 (ranked_drop_p): every u >= p, so no ranks and no draws
                return torch.ones_like(x, dtype=torch.bool)
            keep, tried = self._ranked_keep_compiled(x, i, name, start, row_len)
            if keep is not None:
                return keep
            u = rng.dare_uniform(self.seed, i, name, x.numel(), start=start, device=x.device, stream=rng.DELLA_STREAM)
            return u >= self.ranked_drop_p(x.view(-1, row_len), i, compiled=not tried).reshape(-1)
        if self.sparsify is Sparsify.MAGNITUDE:
            return x.abs() >= stats.thresholds[i]
        if self.sparsify is Sparsify.BAND:
            return (x.abs() >= stats.thresholds[i]) & (x.abs() < stats.ceilings[i])
        if self.sparsify is Sparsify.RANDOM:
            u = rng.dare_uniform(self.seed, i, name, x.numel(), start=start, device=x.device)
            return u >= self.drop_p[i]
        return torch.ones_like(x, dtype=torch.bool)

    def _ranked_keep_compiled(self, x: torch.Tensor, i: int, name: str, start: int,
                              row_len: int) -> tuple[torch.Tensor | None, bool]:
        """(keep_masks' DELLA rule in one compiled pass: the drop probabilities, the draws and the
        comparison, jit_kernels.della_drop_p with draw; or None for the torch code, whether the
        kernel was tried: it declines rows with Inf or NaN)."""
        density, eps = self.densities[i], self.epsilons[i]
        fast = jit.compiled(x.numel()) if x.device.type == "cpu" and density < 1 else None
        if fast is None:
            return None, False
        keep = torch.empty(x.numel(), dtype=torch.bool)
        rows = x.contiguous().view(-1, row_len)
        if not fast.della_drop_p(rows.numpy(), float(density), float(eps), _NO_P, keep.view(torch.uint8).view(
                rows.shape).numpy(), True, start, *rng.stream_key(self.seed, i, name, rng.DELLA_STREAM)):
            return None, True
        return keep, True

    def table(self, stats: TensorStats | None, device) -> torch.Tensor:
        """The float32 [7, N] table of per-model numbers (TABLE_ROWS), on the kernel's device."""
        stats = stats or TensorStats()
        n = self.n_models
        if any(self.missing(stats)):
            raise ValueError(f"the plan needs statistics this tensor's stats lack: {stats}")
        thresholds = tuple(float(t) for t in stats.thresholds) if self.trims else (0.0,) * n
        factors = tuple(float(f) for f in stats.factors) if self.rescale is Rescale.L1 else (1.0,) * n
        ceilings = tuple(float(c) for c in stats.ceilings) if self.band else (math.inf,) * n
        rows = [self.weights, thresholds, self.drop_p, self.divisors, factors, ceilings,
                self.tall_lambdas or (0.0,) * n]
        return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)


# The plan's step fields; an executor lists the values it implements for each (a field it does
# not list is a step it lacks, so a new step is refused until a backend implements it).
STEPS = ("sparsify", "rescale", "consensus", "coefficients")


def unsupported_steps(plan: ElementPlan, supported: dict) -> str | None:
    """Why an executor implementing `supported` ({field: set of step values}) cannot run `plan`, or None."""
    for step in STEPS:
        value = getattr(plan, step)
        if value not in supported.get(step, ()):
            return f"it has no {step} step {getattr(value, 'value', value)!r}"
    return None


def kept_inputs(plan: ElementPlan, base: torch.Tensor | None, models: list[torch.Tensor], stats: TensorStats,
                name: str, start: int, row_len: int | None = None):
    """(i, x_i, keep_i) of one flat chunk (elements start.. of tensor `name`): model i's float32
    task vector (or the model itself, for a plan without deltas) and the sparsifier's bool keep mask."""
    b = base.to(torch.float32) if plan.deltas else None
    for i, model in enumerate(models):
        x = model.to(torch.float32)
        if b is not None:
            x = x - b
        yield i, x, plan.keep_masks(x, i, stats, name, start, row_len)


def add_kept_l1(plan: ElementPlan, base: torch.Tensor | None, models: list[torch.Tensor], stats: TensorStats,
                name: str, start: int, totals: list, kepts: list, row_len: int | None = None,
                masks: list | None = None) -> None:
    """Add ||x_i||_1 and ||kept x_i||_1 of one flat chunk (elements start.. of tensor `name`,
    on any device) into the exact accumulators totals[i] and kepts[i] (exactsum.AbsSum); each
    model's bool keep mask is appended to `masks` where given (a backend may reuse it to merge)."""
    for i, x, keep in kept_inputs(plan, base, models, stats, name, start, row_len):
        if masks is not None:
            masks.append(keep)
        totals[i].add(x)
        kepts[i].add(torch.where(keep, x, torch.zeros((), dtype=torch.float32, device=x.device)))


def add_gram(plan: ElementPlan, base: torch.Tensor | None, models: list[torch.Tensor], start: int,
             view, gram: torch.Tensor) -> None:
    """Add one flat chunk's products into the Gram statistic (lines_fast/gram.py) of the plan's
    inputs x_i (the task vectors, or the models), on any device."""
    b = base.to(torch.float32) if plan.deltas else None
    # Task vectors in float32 (their rounding is the method's); the models themselves as they are
    # (add_gram widens them exactly).
    xs = [m.to(torch.float32) - b for m in models] if b is not None else list(models)
    gram_stats.add_gram(gram, xs, start, view)


def elected_sign_sum(plan: ElementPlan, base: torch.Tensor, models: list[torch.Tensor], stats: TensorStats,
                     name: str, start: int) -> int:
    """sum_j sign(sum_i w_i trim(x_i)[j]) over one flat chunk (any device), for the official TIES
    rule's majority sign: an integer, so chunk totals add exactly in any order."""
    b = base.to(torch.float32)
    total = torch.zeros_like(b)
    for i, model in enumerate(models):
        x = model.to(torch.float32) - b
        kept = torch.where(plan.keep_masks(x, i, stats, name, start), x, torch.zeros((), device=x.device))
        total = total + plan.weights[i] * kept
    return int(torch.sign(total).sum(dtype=torch.int64))


def group_weights(plan: ElementPlan, gram: torch.Tensor) -> torch.Tensor:
    return gram_stats.weights(plan.coefficients, gram, plan.t)


def factors_from_sums(totals: list, kepts: list) -> tuple[float, ...]:
    return tuple(rescale_factor(t.value(), k.value()) for t, k in zip(totals, kepts))
