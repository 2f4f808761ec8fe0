"""The CPU backend's compiled path: one pass per chunk instead of ~30 torch operations.

lines_fast/jit.py's merge_chunk executes the whole per-element plan of a chunk (the steps
backends/cpu.py's _merged_delta runs one torch operation at a time, the same float32
operations in the same order, so the bits are the same); packed_histograms counts TIES's
selection histograms over all cores; gram sums the Gram statistic of slerp, nuslerp and
model_stock; add_kept_l1 takes DARE's and DELLA's L1 rescale sums and packs their keep masks. This module decides which plans and inputs it takes and
hands it numpy views of the tensors; everything else stays on the torch path, which is also
the path of every chunk the compiled one declines (an Inf or NaN read: the torch path then
names the model).

What the compiled merge does not take, by the plan's steps (never by method name): packed jobs
of many tensors (per-element thresholds) and inputs other than bf16, fp16 and fp32. DELLA's
ranked drops come to it as keep masks, those its rescale statistics kept or, without them
(no L1 rescale, or past the backend's mask budget), drawn for each chunk by the backend. Gram weights are taken per tensor, row or column (model_stock's
filter_wise, nuslerp without flatten), and so is their statistic (gram_chunk, gram_columns).
"""
from __future__ import annotations

import math

import numpy as np
from ..lazy import torch

from .. import dtypes, jit
from ..exactsum import EXPONENT_BINS
from ..gram import GroupView, group_view, new_gram
from ..methods import Coefficients, Consensus, Rescale, Sparsify
from ..plan import ElementPlan, TensorStats, kept_inputs, unsupported_steps
from ..rng import dare_uniform
from ..selection import BINS
from .base import MergeJob

# The plan steps merge_chunk executes (plan.unsupported_steps' format).
FUSED = {
    # RANKED (DELLA): as keep masks given per chunk (FusedMerge.chunk; backends/cpu.py _chunk_masks).
    "sparsify": {Sparsify.NONE, Sparsify.MAGNITUDE, Sparsify.BAND, Sparsify.RANDOM, Sparsify.RANKED},
    "rescale": {Rescale.NONE, Rescale.INVERSE, Rescale.L1},
    "consensus": {Consensus.NONE, Consensus.SIGN, Consensus.COPY},
    "coefficients": set(Coefficients),   # Gram weights per tensor, row or column (FusedMerge.__init__)
}
# A plan that only sums (no trim, election, drop or rescale) gains little per element compiled
# (llama-336m task_arithmetic, 2 cores: 21 -> 12 ms per 35M elements of kernel, but a net 0.5 s
# loss end to end with numba's ~0.75 s load), so its work counts 1/256: it switches at ~4e9
# elements of work (a 1.3B model and 3 fine-tunes), TIES-like plans at jit.JIT_AFTER.
LIGHT_PLAN_SHARE = 1 / 256
HISTOGRAM_SPAN = 1 << 22   # elements per packed_histograms call: its per-thread bins are zeroed per call
# The type the kernels read each input dtype's bits as (dtypes.EXACT_IN_FLOAT32), by str(torch dtype).
_ARRAY_DTYPES = {f"torch.{d.name}": bits for d, bits in dtypes.EXACT_IN_FLOAT32.items()}


def as_array(t: torch.Tensor) -> np.ndarray | None:
    """A flat numpy view of a contiguous CPU tensor the kernels read (bf16 and fp16 as their bits), or None."""
    view = _ARRAY_DTYPES.get(str(t.dtype))
    if view is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    try:
        return t.reshape(-1).view(getattr(torch, view)).numpy()
    except (TypeError, RuntimeError):   # a torch whose numpy bridge lacks uint16: the torch path
        return None


def _inputs(job: MergeJob, with_base: bool):
    """(base array or a dummy, model arrays) where the kernels can read them all, else None."""
    models = [as_array(m) for m in job.models]
    if any(m is None for m in models) or len({m.dtype for m in models}) != 1:
        return None   # the models go to the kernel as one tuple: one dtype
    if not with_base:
        return np.zeros(1, models[0].dtype), tuple(models)
    base = as_array(job.base)
    return None if base is None else (base, tuple(models))


def _finite_numbers(plan: ElementPlan, stats: TensorStats) -> bool:
    """Whether the per-tensor numbers the kernel multiplies by are finite. With --allow-nonfinite an
    Inf or NaN input can make an L1 factor or a Gram weight NaN, which the kernel, checking only its
    inputs, would not spread as the torch path and the reference do (a NaN c_i fails the election's
    comparisons and drops out there)."""
    if plan.rescale is Rescale.L1 and stats is not None and stats.factors is not None:
        if not all(math.isfinite(float(f)) for f in stats.factors):
            return False
    if plan.grouped and stats is not None and stats.group_weights is not None:
        return bool(torch.isfinite(stats.group_weights).all())
    return True


def _steps(plan: ElementPlan) -> int:
    """merge_chunk's step bits for the plan."""
    return ((jit.STEP_BASE if plan.uses_base else 0) | (jit.STEP_DELTAS if plan.deltas else 0)
            | (jit.STEP_TRIM if plan.trims else 0) | (jit.STEP_BAND if plan.band else 0)
            | (jit.STEP_DROP if plan.sparsify is Sparsify.RANDOM else 0)
            | (jit.STEP_DIVIDE if plan.rescale is Rescale.INVERSE else 0)
            | (jit.STEP_MULTIPLY if plan.rescale is Rescale.L1 else 0)
            | (jit.STEP_ELECT if plan.consensus is Consensus.SIGN else 0)
            | (jit.STEP_COPY if plan.consensus is Consensus.COPY else 0)
            | (jit.STEP_NORMALIZE if plan.normalize else 0) | (jit.STEP_TALL if plan.tall_k else 0))


def takes(plan: ElementPlan) -> bool:
    """Whether the compiled merge runs the plan's chunks (FusedMerge.of adds each job's conditions).
    DELLA's drops only as keep masks given to each chunk (the backend's: from its statistics, or
    drawn for the chunk)."""
    return unsupported_steps(plan, FUSED) is None


def jit_work(plan: ElementPlan, elements: int) -> int:
    """`elements` of merge work (numel x models) as jit.compiled counts it for this plan."""
    light = (not plan.trims and plan.sparsify is Sparsify.NONE and plan.consensus is not Consensus.SIGN
             and plan.rescale is Rescale.NONE and not plan.grouped)   # a Gram statistic: 10x compiled
    return int(elements * LIGHT_PLAN_SHARE) if light else elements


class FusedMerge:
    """One job's compiled merge: `chunk(s, e, out, kept)` writes the merged float32 values of
    elements s..e (out = base + scale * tau_m) and says whether it did."""

    def __init__(self, kernels, job: MergeJob, plan: ElementPlan, stats: TensorStats, arrays):
        self._kernel = kernels.merge_chunk
        self._job, self._plan = job, plan
        self._base, self._models = arrays
        self._table = plan.table(stats, "cpu").numpy()
        self._steps = _steps(plan)
        self._group_weights, self._group_len = np.zeros((1, 1), np.float32), np.int64(1)
        if plan.grouped:   # x_i * w_i[group], as the torch path
            view = group_view(job.models[0].shape, plan.group_by)
            if view.groups == 1:
                self._table[0] = stats.group_weights[:, 0].numpy()
            else:
                self._group_weights = stats.group_weights.contiguous().numpy()
                self._group_len = np.int64(view.group_len)
                self._steps |= jit.STEP_GROUP_ROWS if view.by_rows else jit.STEP_GROUP_COLUMNS
        self._zero_sign = np.float32(plan.zero_sign(stats) if plan.consensus is Consensus.SIGN else 1.0)
        self._weight_sum = np.float32(plan.weight_sum)
        self._scale = np.float32(job.scale)
        self._tall = np.int32(plan.tall_k)
        self._no_draws = np.zeros((1, 1), np.float32)
        self._no_masks = tuple(np.zeros(1, np.uint8) for _ in job.models)
        self._no_sum = np.zeros(1, np.float32)

    @classmethod
    def of(cls, kernels, job: MergeJob, plan: ElementPlan, stats: TensorStats) -> "FusedMerge | None":
        if kernels is None or job.segments is not None or plan.n_models != len(job.models) or not takes(plan):
            return None
        if not _finite_numbers(plan, stats):   # --allow-nonfinite: torch spreads a NaN factor as the reference
            return None
        arrays = _inputs(job, plan.uses_base)
        return None if arrays is None else cls(kernels, job, plan, stats, arrays)

    def chunk(self, s: int, e: int, out: torch.Tensor, kept: list[torch.Tensor] | None = None,
              tau_only: bool = False, task_sum: torch.Tensor | None = None) -> bool:
        """kept: DARE's or DELLA's packed keep masks of this chunk (backends/cpu.py _chunk_masks), or None.
        tau_only: out = tau_m (lambda = 1, no base); task_sum: receives sum_i tau_i (both for
        LiNeS alpha auto's norms, backends/cpu.py's delta_norms)."""
        plan, steps = self._plan, self._steps
        steps |= (jit.STEP_TAU if tau_only else 0) | (jit.STEP_TASK_SUM if task_sum is not None else 0)
        draws, masks = self._no_draws, self._no_masks
        if kept is not None:
            steps = steps & ~jit.STEP_DROP | jit.STEP_KEPT
            masks = tuple(k.numpy() for k in kept)
        elif plan.ranked:   # DELLA's per-row drop probabilities are not a kernel step: masks, or the torch path
            return False
        elif plan.sparsify is Sparsify.RANDOM:
            draws = torch.stack([dare_uniform(plan.seed, i, self._job.name, e - s, start=s)
                                 for i in range(plan.n_models)]).numpy()
        base = self._base[s:e] if plan.uses_base else self._base
        return bool(self._kernel(base, tuple(m[s:e] for m in self._models), draws, masks, self._table, steps,
                                 self._zero_sign, self._weight_sum, self._scale, out.numpy(),
                                 self._no_sum if task_sum is None else task_sum.numpy(), self._tall,
                                 self._group_weights, self._group_len, np.int64(s),
                                 torch.get_num_threads()))


def packed_histograms(kernels, base: torch.Tensor, models: list[torch.Tensor], spans) -> torch.Tensor | None:
    """selection.py's packed histograms [N, BINS] of |models[i] - base|, counted by the compiled
    kernel span by span (`spans(numel, step)`, which releases pages behind it); None where the
    kernel cannot read the inputs."""
    arrays = [as_array(t) for t in [base, *models]]
    if kernels is None or any(a is None for a in arrays) or len({a.dtype for a in arrays[1:]}) != 1:
        return None
    hist = torch.zeros(len(models), BINS, dtype=torch.int64)
    counts = hist.numpy()
    for s, e in spans(arrays[0].shape[0], HISTOGRAM_SPAN):
        # Each thread zeroes and sums its own 65536 bins per model: not worth it for less than 256K elements.
        threads = max(1, min(torch.get_num_threads(), (e - s) >> 18))
        kernels.packed_histograms(arrays[0][s:e], tuple(a[s:e] for a in arrays[1:]), counts, threads)
    return hist


def bucket_histogram(kernels, base: torch.Tensor, model: torch.Tensor, bucket: int, spans) -> torch.Tensor | None:
    """selection.py's refine histogram [BINS]: the low 16 bits of the |model - base| in `bucket`,
    counted by the compiled kernel span by span; None where the kernel cannot read the inputs."""
    arrays = [as_array(t) for t in (base, model)]
    if kernels is None or any(a is None for a in arrays):
        return None
    hist = torch.zeros(BINS, dtype=torch.int64)
    counts = hist.numpy()
    for s, e in spans(arrays[0].shape[0], HISTOGRAM_SPAN):
        threads = max(1, min(torch.get_num_threads(), (e - s) >> 18))
        kernels.bucket_histogram(arrays[0][s:e], arrays[1][s:e], bucket, counts, threads)
    return hist


def gram(kernels, job: MergeJob, plan: ElementPlan, view: GroupView, spans) -> torch.Tensor | None:
    """The job's Gram statistic [groups, M, M] (gram.py) summed by the compiled kernels chunk by
    chunk (`spans(numel)`, which releases pages behind it), or None: inputs the kernels cannot read."""
    if kernels is None:
        return None
    arrays = _inputs(job, plan.deltas)   # the task vectors' Gram, or the models' own
    if arrays is None:
        return None
    base, models = arrays
    out = new_gram(view, len(models))
    threads = torch.get_num_threads()
    if not view.by_rows and view.groups > 1:   # per column: [pairs, columns] sums, then the matrices
        count = len(models)
        sums = np.zeros((count * (count + 1) // 2, view.cols), np.float64)
        for s, e in spans(models[0].shape[0]):
            kernels.gram_columns(base[s:e] if plan.deltas else base, tuple(m[s:e] for m in models), plan.deltas, s,
                                 view.cols, sums, max(1, min(threads, view.cols >> 6)))
        pairs = [(a, b) for a in range(count) for b in range(a, count)]
        for p, (a, b) in enumerate(pairs):
            out[:, a, b] = out[:, b, a] = torch.from_numpy(sums[p])
        return out
    row_len = view.cols if view.by_rows else max(1, models[0].shape[0])   # one group: one row of it all
    grams = out.numpy()
    for s, e in spans(models[0].shape[0]):
        kernels.gram_chunk(base[s:e] if plan.deltas else base, tuple(m[s:e] for m in models), plan.deltas, s,
                           row_len, grams, threads)
    return out


def add_kept_l1(kernels, plan: ElementPlan, base: torch.Tensor, models: list[torch.Tensor], stats: TensorStats,
                name: str, start: int, totals: list, kepts: list, row_len: int | None, slots) -> None:
    """plan.add_kept_l1 of one flat CPU chunk with both exact sums and the masks' packing in one
    compiled pass per model (jit_kernels.add_abs_bins_kept): the same integer bins and keep masks.
    slots: one uint8 view per model to pack the masks into (the backend's mask store), or None."""
    for i, x, keep in kept_inputs(plan, base, models, stats, name, start, row_len):
        x, keep = x.contiguous(), keep.contiguous()
        packed = slots[i] if slots is not None else torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
        bins = torch.zeros(2, EXPONENT_BINS, dtype=torch.int64)   # every byte of packed is written
        # A parallel call costs more than the pass over a small tensor (a norm, a bias): one thread there.
        threads = max(1, min(torch.get_num_threads(), x.numel() >> 16))
        kernels.add_abs_bins_kept(x.view(torch.int32).numpy(), keep.view(torch.uint8).numpy(), bins[0].numpy(),
                                  bins[1].numpy(), packed.numpy(), threads)
        totals[i].add_bins(bins[0])
        kepts[i].add_bins(bins[1])
