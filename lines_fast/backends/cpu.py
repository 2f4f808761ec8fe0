"""The CPU backend: the default where there is no GPU.

It executes the per-element plan (lines_fast/plan.py) with the same float32 operations in
the same order as lines_fast/reference.py (so election signs and DARE masks are identical,
and values agree bitwise in practice), but chunk by chunk: each tensor is walked in slices
of `chunk` elements that stay in the CPU caches, into buffers allocated once, so nothing
the size of a tensor is ever materialised in float32. Both cores are kept busy by torch's
intra-op threads, and a read-ahead thread faults in the next tensor's pages while the
current one computes.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import replace
from typing import Iterable, Iterator

import numpy as np
from ..lazy import torch

from .. import dtypes, jit
from ..errors import NonFiniteInput
from ..exactsum import AbsSum, row_abs_sums
from ..methods import Coefficients, Consensus, Rescale, Sparsify
from ..gram import group_index, group_view, new_gram
from ..plan import (ElementPlan, TensorStats, add_gram, add_kept_l1, elected_sign_sum, factors_from_sums,
                    group_weights, rescale_factor, unsupported_steps)
from ..rng import DELLA_STREAM, dare_uniform, dare_uniform_rows
from ..selection import BINS, NONZERO_LOW, float_to_bits, tensor_thresholds
from .base import MergeJob
from .cpu_fused import FusedMerge, bucket_histogram, jit_work, packed_histograms
from .cpu_fused import add_kept_l1 as compiled_kept_l1
from .cpu_fused import gram as compiled_gram

DEFAULT_CHUNK = 1 << 18  # 256K elements: 1 MB of float32 per buffer, cache-resident
_PAGE = 4096
# The plan steps this backend executes; any other is refused by supports().
SUPPORTED = {
    "sparsify": {Sparsify.NONE, Sparsify.MAGNITUDE, Sparsify.RANDOM, Sparsify.BAND, Sparsify.RANKED},
    "rescale": {Rescale.NONE, Rescale.INVERSE, Rescale.L1},
    "consensus": {Consensus.NONE, Consensus.SIGN, Consensus.COPY},
    "coefficients": {Coefficients.GIVEN, Coefficients.SLERP, Coefficients.NUSLERP, Coefficients.MODEL_STOCK},
}


class _Buffers:
    """Scratch for one chunk, allocated once: the base, one task vector per model, accumulators."""

    def __init__(self, n_models: int, chunk: int):
        f32 = dict(dtype=torch.float32)
        self.base = torch.empty(chunk, **f32)
        self.tau = [torch.empty(chunk, **f32) for _ in range(n_models)]
        self.acc = torch.empty(chunk, **f32)
        self.num = torch.empty(chunk, **f32)
        self.den = torch.empty(chunk, **f32)
        self.tmp = torch.empty(chunk, **f32)
        self.indicator = torch.empty(chunk, **f32)
        self.bits = torch.empty(chunk, dtype=torch.int32)
        self.flag = torch.empty(chunk, dtype=torch.int32)
        self.task_sum = torch.empty(chunk, **f32)
        self.tall_sum = torch.empty(chunk, **f32)
        self.tall_count = torch.empty(chunk, dtype=torch.int32)


READ_AHEAD_MIN = 1 << 20
KEEP_BUDGET = 64 << 20   # bytes of DARE / DELLA keep masks (8 per byte) kept from a job's statistics to its merge
_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def _pack_bits(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A flat bool mask into `out` (uint8, ceil(n / 8)): 8 elements a byte, the last zero-padded."""
    n = mask.numel()
    padded = torch.zeros(out.numel() * 8, dtype=torch.uint8)
    padded[:n] = mask.reshape(-1)
    return torch.sum(padded.view(-1, 8) * _bit_values(), dim=1, dtype=torch.uint8, out=out)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n elements of a _pack_bits mask, as bool."""
    return (packed.unsqueeze(1).bitwise_and(_bit_values()) != 0).reshape(-1)[:n]


@functools.cache
def _bit_values() -> torch.Tensor:
    return torch.tensor(_BITS, dtype=torch.uint8)


def _input_bytes(job: MergeJob) -> int:
    return sum(t.numel() * t.element_size() for t in [job.base, *job.models] if t is not None)


def _touch_pages(tensors: list[torch.Tensor]) -> None:
    """Fault in the pages behind memory-mapped tensors (one byte read per page)."""
    for t in tensors:
        if t.numel():
            raw = t.reshape(-1).view(torch.uint8)
            raw[::_PAGE].sum()


def segment_thresholds(job: MergeJob, plan: ElementPlan) -> list[tuple[torch.Tensor, ...]]:
    """Per model, per rank, the tensor-scope threshold of each of the job's S packed tensors of L
    elements (float32 [S]): the k-th largest |f32(theta_i) - f32(theta_0)| of each, as
    selection.sorted_thresholds finds it for one tensor (inf for k = 0), one sort for all S."""
    count, length = job.segments
    base32 = job.base.reshape(-1).float()
    found = []
    for model, ranks in zip(job.models, plan.magnitude_ranks(length)):
        ordered = (model.reshape(-1).float() - base32).abs_().view(count, length).sort(dim=1, descending=True).values
        found.append(tuple(torch.full((count,), float("inf")) if k == 0 else ordered[:, k - 1].contiguous()
                           for k in ranks))
    return found


def _per_element(value, segment: torch.Tensor | None):
    """A per-tensor number for a chunk's elements: a float as it is, or, per packed tensor (float32
    [S]), each element's own tensor's value (segment: each element's tensor)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    return value.index_select(0, segment)


def _bits_of(threshold, segment: torch.Tensor | None):
    """A threshold for a chunk's elements: a float, or per element the float32 bits (int32) of its
    own packed tensor's threshold."""
    value = _per_element(threshold, segment)
    return value if isinstance(value, float) else value.view(torch.int32)


def _check_finite(values: torch.Tensor, name: str, model_index: int) -> None:
    """NonFiniteInput if any of `values` is Inf or NaN: one sum, looked at closer only where it is
    not finite (a sum of large finite values can overflow)."""
    if not torch.isfinite(values.sum()) and not torch.isfinite(values).all():
        raise NonFiniteInput(name, model_index)


class CpuBackend:
    name = "cpu"
    packs_segments = True   # takes packs of equal-sized tensors with a threshold each (MergeJob.segments)

    def __init__(self, chunk: int = DEFAULT_CHUNK, check_finite: bool = True, read_ahead: bool = True,
                 compiled: bool | None = None):
        self.chunk = chunk
        # The compiled path (backends/cpu_fused.py): None once a process has done enough work in torch
        # for numba's load to pay (jit.compiled), True always (where numba loads), False never.
        self.compiled = compiled
        self.check_finite = check_finite
        self.read_ahead = read_ahead
        self._release = None   # the current job's release(start, end), set by releasing()
        # DARE / DELLA keep masks of the job being merged, by chunk start, as its L1 rescale
        # statistics drew them, so the merge does not draw (and rank) them again: None outside a
        # merge, and only up to KEEP_BUDGET bytes (the rest are drawn again, to the same values).
        self._kept: dict[int, list[torch.Tensor]] | None = None
        self._kept_bytes = 0
        self._kept_store: torch.Tensor | None = None
        self._buffers: dict[int, _Buffers] = {}
        self._seg_draws: tuple | None = None   # (job, its packed DARE draws per model)

    def expect(self, plan: ElementPlan, elements: int) -> None:
        """A merge this large loads the compiled kernels in the background while it starts in torch."""
        if self.compiled is None:
            jit.prefetch(jit_work(plan, elements))

    def supports(self, plan: ElementPlan) -> str | None:
        return unsupported_steps(plan, SUPPORTED)

    def _bufs(self, n_models: int, size: int | None = None) -> _Buffers:
        size = max(size or self.chunk, self.chunk)
        if (n_models, size) not in self._buffers:
            self._buffers[n_models, size] = _Buffers(n_models, size)
        return self._buffers[n_models, size]

    def _kernels(self, work: int):
        """The compiled kernels for `work` elements of work, or None: the torch path."""
        if self.compiled is None:
            return jit.compiled(work)
        return jit.kernels() if self.compiled else None

    def _fused(self, job: MergeJob, plan: ElementPlan, stats: TensorStats) -> FusedMerge | None:
        """The job's compiled merge, or None: the torch path (backends/cpu_fused.py says which)."""
        work = jit_work(plan, job.models[0].numel() * len(job.models))
        return FusedMerge.of(self._kernels(work), job, plan, stats)

    def _spans(self, numel: int, step: int | None = None):
        """(start, end) of each chunk; once the caller moves past one, the current job's inputs
        there are released (releasing()), so a pass over a huge tensor keeps few pages mapped."""
        step = step or self.chunk
        for start in range(0, numel, step):
            end = min(start + step, numel)
            yield start, end
            if self._release is not None:
                self._release(start, end)

    @contextlib.contextmanager
    def releasing(self, job: MergeJob):
        """Within it, every pass over chunks releases job's inputs behind it (job.release)."""
        previous, self._release = self._release, job.release
        try:
            yield
        finally:
            self._release = previous

    def _step(self, job: MergeJob, plan: ElementPlan) -> tuple[int, int | None]:
        """(chunk length, row length): whole rows for DELLA's per-row ranks, else the chunk."""
        if not plan.ranked:
            return self.chunk, None
        row = plan.rank_row_len(job.models[0].shape, job.name)
        return (self.chunk - self.chunk % row if row <= self.chunk else row), row

    # -- loading --------------------------------------------------------------------------
    def _load(self, out: torch.Tensor, model: torch.Tensor, base_f32: torch.Tensor | None,
              name: str, model_index: int) -> torch.Tensor:
        """out = float32(model) [- base_f32], checking for NaN/Inf cheaply (one reduction)."""
        out.copy_(model)
        if base_f32 is not None:
            out.sub_(base_f32)
        if self.check_finite and not torch.isfinite(out.sum()):
            # The sum is non-finite if any term is (or, in theory, on overflow): look closer.
            if base_f32 is not None and not torch.isfinite(base_f32).all():
                raise NonFiniteInput(name, -1)
            if not torch.isfinite(model).all():
                raise NonFiniteInput(name, model_index)
        return out

    # -- statistics -----------------------------------------------------------------------
    def magnitude_histograms(self, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        return self._histograms(base, models, None)

    def magnitude_histogram(self, base: torch.Tensor, model: torch.Tensor,
                            bucket: int | None = None) -> torch.Tensor:
        return self._histograms(base, [model], bucket)[0]

    def _histograms(self, base: torch.Tensor, models: list[torch.Tensor], bucket: int | None) -> torch.Tensor:
        """[N, BINS] counts of |models[i] - base|: packed, or the bucket's low bits. Each chunk
        of the base is widened once for all models."""
        kernels = self._kernels(base.numel() * len(models))
        if bucket is None:
            hist = packed_histograms(kernels, base, models, self._spans)
            if hist is not None:
                return hist
        elif len(models) == 1:
            hist = bucket_histogram(kernels, base, models[0], bucket, self._spans)
            if hist is not None:
                return hist[None]
        base_flat = base.reshape(-1)
        bufs = self._bufs(len(models))
        hist = torch.zeros(len(models), BINS, dtype=torch.int64)
        for s, e in self._spans(base_flat.numel()):
            n = e - s
            b = bufs.base[:n]
            b.copy_(base_flat[s:e])
            for i, model in enumerate(models):
                tau = bufs.tau[i][:n]
                tau.copy_(model.reshape(-1)[s:e])
                tau.sub_(b).abs_()  # NaN/Inf are caught by the merge pass, which always checks
                bits = tau.view(torch.int32)
                if bucket is None:
                    # Packed bin (selection.py): high bits | 0x8000 where the low bits are not 0.
                    # -(low) >> 31 is -1 exactly when low != 0 (bool tensors cost far more on CPU).
                    flag = torch.bitwise_and(bits, 0xFFFF, out=bufs.flag[:n]).neg_()
                    flag.bitwise_right_shift_(31).bitwise_and_(NONZERO_LOW)
                    key = torch.bitwise_right_shift(bits, 16, out=bufs.bits[:n]).bitwise_or_(flag)
                    hist[i] += torch.bincount(key, minlength=BINS)
                else:
                    # Low 16 bits of the elements in `bucket`: shift that bucket to 1..65536, clamp
                    # everything else into bins 0 and 65537, count, keep the middle (no bool tensors).
                    key = torch.sub(bits, (bucket << 16) - 1, out=bufs.bits[:n]).clamp_(0, BINS + 1)
                    hist[i] += torch.bincount(key, minlength=BINS + 2)[1:BINS + 1]
        return hist

    def task_vector_sum_l1(self, base: torch.Tensor, models: list[torch.Tensor]) -> float:
        base_flat = base.reshape(-1)
        flats = [m.reshape(-1) for m in models]
        bufs = self._bufs(len(models))
        total = AbsSum()   # exact: the same α whatever the chunking or thread count
        for s, e in self._spans(base_flat.numel()):
            n = e - s
            b = bufs.base[:n]
            b.copy_(base_flat[s:e])
            acc = bufs.acc[:n]
            acc.zero_()
            for i, m in enumerate(flats):
                acc.add_(self._load(bufs.tau[i][:n], m[s:e], b, "", i))
            total.add(acc)
        return total.value()

    def tensor_stats(self, job: MergeJob, plan: ElementPlan) -> TensorStats:
        """job.stats completed with what the plan needs and the engine did not give: tensor-scope
        thresholds (exact histograms) and the L1 rescale factors (exact sums, one more read)."""
        with self.releasing(job):
            return self._tensor_stats(job, plan)

    def _tensor_stats(self, job: MergeJob, plan: ElementPlan) -> TensorStats:
        stats = job.stats or TensorStats()
        need_thresholds, need_factors, need_weights = plan.missing(stats)
        if need_factors and job.segments is not None:   # packed tensors: a factor each, exact
            stats = replace(stats, factors=self._segment_factors(job, plan))
            need_factors = False
        if need_thresholds and job.segments is not None:
            stats = plan.stats_from_thresholds(segment_thresholds(job, plan), stats)
        elif need_thresholds:
            found = tensor_thresholds(self, job.base, job.models, plan.magnitude_ranks(job.base.numel()))
            stats = plan.stats_from_thresholds(found, stats)
        if need_weights:
            view = group_view(job.models[0].shape, plan.group_by)
            gram = compiled_gram(self._kernels(job.models[0].numel() * len(job.models)), job, plan, view, self._spans)
            if gram is None:
                gram = new_gram(view, len(job.models))
                base = job.base.reshape(-1) if plan.deltas else None
                models = [m.reshape(-1) for m in job.models]
                for s, e in self._spans(models[0].numel()):
                    add_gram(plan, None if base is None else base[s:e], [m[s:e] for m in models], s, view, gram)
            stats = replace(stats, group_weights=group_weights(plan, gram))
        if need_factors:
            totals, kepts = [AbsSum() for _ in job.models], [AbsSum() for _ in job.models]
            base = job.base.reshape(-1)
            models = [m.reshape(-1) for m in job.models]
            step, row = self._step(job, plan)
            kernels = self._kernels(base.numel() * len(models))
            for s, e in self._spans(base.numel(), step):
                slots = self._keep_slots(len(models), e - s)
                chunk = [m[s:e] for m in models]
                if kernels is not None:   # the sums and the masks' packing in one compiled pass
                    compiled_kept_l1(kernels, plan, base[s:e], chunk, stats, job.name, s, totals, kepts, row, slots)
                else:
                    keep = [] if slots is not None else None
                    add_kept_l1(plan, base[s:e], chunk, stats, job.name, s, totals, kepts, row, keep)
                    for mask, slot in zip(keep or [], slots or []):
                        _pack_bits(mask, slot)
                if slots is not None:
                    self._kept[s] = slots
            stats = replace(stats, factors=factors_from_sums(totals, kepts))
        return stats

    def _segment_draws(self, job: MergeJob, plan: ElementPlan) -> list[torch.Tensor]:
        """DARE's u of a packed job, per model: each tensor's own draws (keyed by its name) end to
        end; drawn once for its rescale statistics and its merge."""
        if self._seg_draws is None or self._seg_draws[0] is not job:
            draws = [dare_uniform_rows(plan.seed, i, list(job.segment_names), job.segments[1])
                     for i in range(len(job.models))]
            self._seg_draws = (job, draws)
        return self._seg_draws[1]

    def _segment_factors(self, job: MergeJob, plan: ElementPlan) -> tuple[torch.Tensor, ...]:
        """The L1 rescale factor of each packed tensor, per model (float32 [S]): the exact sums of
        |x_i| and of its kept values per tensor, as add_kept_l1 and AbsSum give them for one."""
        count, length = job.segments
        base = job.base.reshape(-1).float() if plan.deltas else None
        draws = self._segment_draws(job, plan)
        factors = []
        for i, model in enumerate(job.models):
            x = model.reshape(-1).float()
            if base is not None:
                x = x - base
            kept = torch.where(draws[i] >= plan.drop_p[i], x, torch.zeros((), dtype=torch.float32))
            totals, kepts = row_abs_sums(x.view(count, length)), row_abs_sums(kept.view(count, length))
            factors.append(torch.tensor([rescale_factor(t, k) for t, k in zip(totals, kepts)], dtype=torch.float32))
        return tuple(factors)

    def _keep_slots(self, n_models: int, n: int) -> list[torch.Tensor] | None:
        """Room for one chunk's packed masks (one uint8 view per model) in the backend's one mask
        store, while merging and within KEEP_BUDGET; else None. One store, allocated once: many
        small long-lived tensors between the chunks' big temporaries would fragment the heap."""
        size = -(-n // 8)
        if self._kept is None or self._kept_bytes + n_models * size > KEEP_BUDGET:
            return None
        if self._kept_store is None:
            self._kept_store = torch.empty(KEEP_BUDGET, dtype=torch.uint8)
        at = self._kept_bytes
        self._kept_bytes += n_models * size
        return [self._kept_store[at + k * size:at + (k + 1) * size] for k in range(n_models)]

    @contextlib.contextmanager
    def _keeping_masks(self):
        """Within it, the L1 statistics' keep masks are kept for the merge of the same job."""
        self._kept, self._kept_bytes = {}, 0
        try:
            yield
        finally:
            self._kept, self._kept_bytes = None, 0

    def elected_sign_sum(self, job: MergeJob, plan: ElementPlan) -> int:
        """sum_j sign(sum_i w_i trim(tau_i)[j]) over the tensor (the official rule's majority sign)."""
        stats = self.tensor_stats(job, plan)
        base, models = job.base.reshape(-1), [m.reshape(-1) for m in job.models]
        with self.releasing(job):
            return sum(elected_sign_sum(plan, base[s:e], [m[s:e] for m in models], stats, job.name, s)
                       for s, e in self._spans(base.numel()))

    def delta_norms(self, job: MergeJob, plan: ElementPlan,
                    with_task_sum: bool = True) -> tuple[float, float, TensorStats]:
        """(‖Σ τ_i‖₁ or 0.0, ‖τ_MTL‖₁, the tensor's stats): the task sum is taken from the same
        loaded τ_i, before sparsifying, with the same float32 adds as task_vector_sum_l1."""
        with self._keeping_masks():   # DARE's and DELLA's keep masks, drawn once for both passes
            stats = self.tensor_stats(job, plan)
            task_sum, delta = AbsSum(), AbsSum()
            fused = self._fused(job, plan, stats)
            with self.releasing(job):
                for s, e, bufs in self._chunks(job, plan):
                    task_sum_chunk = bufs.task_sum[:e - s] if with_task_sum else None
                    tau = bufs.acc[:e - s]
                    kept = self._chunk_masks(job, plan, s, e) if fused is not None else None
                    if fused is None or not fused.chunk(s, e, tau, kept, tau_only=True, task_sum=task_sum_chunk):
                        tau = self._merged_delta(job, plan, stats, s, e, bufs, task_sum=task_sum_chunk)
                    delta.add(tau)
                    if with_task_sum:
                        task_sum.add(task_sum_chunk)
        return task_sum.value(), delta.value(), stats

    # -- merging --------------------------------------------------------------------------
    def _chunk_masks(self, job: MergeJob, plan: ElementPlan, s: int, e: int) -> list[torch.Tensor] | None:
        """The packed keep masks of elements s..e for the compiled merge (one uint8 tensor per model,
        element j in bit j % 8 of byte j // 8): those the rescale statistics kept, else DELLA's drawn
        here exactly as the statistics and the torch path draw them (whole rows: each row's ranks,
        then u >= p): without its L1 rescale, or past KEEP_BUDGET. None: no masks (DARE draws its u
        in the kernel's call)."""
        kept = self._kept.get(s) if self._kept is not None and plan.drops else None
        if kept is not None or not plan.ranked:
            return kept
        row = self._step(job, plan)[1]
        base = job.base.reshape(-1)[s:e].float()
        masks = []
        for i, model in enumerate(job.models):
            keep = plan.keep_masks(model.reshape(-1)[s:e].float() - base, i, TensorStats(), job.name, s, row)
            masks.append(torch.from_numpy(np.packbits(keep.numpy(), bitorder="little")))
        return masks

    def _chunks(self, job: MergeJob, plan: ElementPlan):
        numel = job.models[0].numel()
        step, _ = self._step(job, plan)
        bufs = self._bufs(len(job.models), step)
        for s, e in self._spans(numel, step):
            yield s, e, bufs

    def _merged_delta(self, job: MergeJob, plan: ElementPlan, stats: TensorStats, s: int, e: int,
                      bufs: _Buffers, task_sum: torch.Tensor | None = None) -> torch.Tensor:
        """τ_m for elements s..e (λ = 1), the plan's steps in order. Leaves the base in bufs.base.
        task_sum: if given, receives Σ_i τ_i (unsparsified, in model order) for α auto."""
        n = e - s
        b = bufs.base[:n] if plan.uses_base else None
        if b is not None:
            b.copy_(job.base.reshape(-1)[s:e])
            if not plan.deltas and self.check_finite and not torch.isfinite(b.sum()):
                raise NonFiniteInput(job.name, -1)  # a soup's θ0 (LiNeS) is not checked by _load
        if task_sum is not None:
            task_sum.zero_()
        if plan.grouped:   # per-element weights: each element's group's weight (one number for one group)
            view = group_view(job.models[0].shape, plan.group_by)
            groups = group_index(view, s, e) if view.groups > 1 else None
        xs = []
        for i, model in enumerate(job.models):
            x = self._load(bufs.tau[i][:n], model.reshape(-1)[s:e], b if plan.deltas else None, job.name, i)
            if task_sum is not None:
                task_sum.add_(x if plan.deltas else torch.sub(x, b, out=bufs.tmp[:n]))
            xs.append(x)
        keep = self._tall_keep(xs, plan, n, bufs) if plan.tall_k else None
        # Packed tensors (job.segments): each element's tensor, for its own threshold and factor.
        segment = torch.arange(s, e) // job.segments[1] if job.segments is not None else None
        kept = self._kept.get(s) if self._kept is not None else None
        contributions = []
        for i, x in enumerate(xs):
            if plan.trims:
                self._zero_below(x, x, _bits_of(stats.thresholds[i], segment), bufs.tmp[:n])
                if plan.band:
                    self._zero_at_or_above(x, _bits_of(stats.ceilings[i], segment), bufs.tmp[:n])
            elif kept is not None and plan.drops:   # the masks the rescale statistics drew
                x.masked_fill_(~_unpack_bits(kept[i], n), 0.0)
            elif plan.ranked:   # DELLA: per-element drop probabilities from the row ranks (whole rows here)
                drop_p = plan.ranked_drop_p(x.view(-1, self._step(job, plan)[1]), i).reshape(-1)
                u = dare_uniform(plan.seed, i, job.name, n, start=s, stream=DELLA_STREAM)
                x.masked_fill_(u < drop_p, 0.0)
            elif plan.sparsify is Sparsify.RANDOM:
                # Drop where u < p: u, p >= 0 order as their bit patterns.
                u = (self._segment_draws(job, plan)[i][s:e].clone() if job.segments is not None
                     else dare_uniform(plan.seed, i, job.name, n, start=s))
                self._zero_below(x, u, plan.drop_p[i], None)
            if plan.rescale is Rescale.INVERSE:
                x.div_(plan.divisors[i])
            elif plan.rescale is Rescale.L1:
                x.mul_(_per_element(stats.factors[i], segment))
            if plan.grouped:
                weights = stats.group_weights[i]
                contributions.append(x.mul_(weights.index_select(0, groups) if groups is not None
                                            else float(weights[0])))
                continue
            w = plan.weights[i]
            contributions.append(x if w == 1.0 else x.mul_(w))   # c_i = w_i * x_i
        if plan.consensus is Consensus.SIGN:
            merged = self._disjoint_merge(contributions, plan.weights, plan.normalize, n, bufs,
                                          plan.zero_sign(stats))
        else:
            merged = bufs.acc[:n]
            # From +0 as torch.sum (-0.0 + -0.0 sums to +0.0 there), or for COPY from -0.0, which
            # adds nothing: the lone product itself.
            merged.fill_(-0.0 if plan.consensus is Consensus.COPY else 0.0)
            for c in contributions:
                merged.add_(c)
            if plan.normalize:
                merged.div_(plan.weight_sum)
        if keep is not None:
            merged.view(torch.int32).bitwise_and_(keep)   # +0 where the consensus mask is off
        if b is not None and not plan.deltas:
            merged.sub_(b)   # a soup with LiNeS: τ_MTL = soup - θ0
        return merged

    @staticmethod
    def _tall_keep(xs: list[torch.Tensor], plan: ElementPlan, n: int, bufs: _Buffers) -> torch.Tensor:
        """The consensus (TALL) mask of the raw task vectors as int32 bits: all ones where at least
        k models matter (|x_i| >= lambda_i * |S - x_i|, S = sum_j x_j in model order), else 0."""
        total, count, scratch = bufs.tall_sum[:n], bufs.tall_count[:n], bufs.num[:n]
        total.zero_()
        for x in xs:
            total.add_(x)
        count.zero_()
        for x, lam in zip(xs, plan.tall_lambdas):
            torch.sub(total, x, out=scratch).abs_().mul_(lam)
            count.add_(torch.abs(x).ge(scratch))
        return count.ge_(plan.tall_k).neg_()   # True -> -1 (all bits), False -> 0

    @staticmethod
    def _zero_below(x: torch.Tensor, key: torch.Tensor, threshold, scratch: torch.Tensor | None) -> None:
        """Set x to +0 where |key| < threshold (keep |key| >= threshold: ties kept; inf keeps nothing).

        Done on the bit patterns, which order as the magnitudes: (|key|bits - t bits) >> 31 is
        all ones where |key| < t, and ANDing x with its complement zeroes exactly those. No
        bool tensors: comparisons and masked_fill cost 4-7x a float op per chunk on CPU.
        `key` is x itself (TIES trim, |x| into scratch) or DARE's u >= 0 (modified in place).
        threshold: a float, its float32 bits (int), or per-element bits (int32, packed tensors).
        """
        magnitude = key if scratch is None else torch.abs(key, out=scratch)
        drop = magnitude.view(torch.int32)
        drop.sub_(float_to_bits(threshold) if isinstance(threshold, float) else threshold)
        drop.bitwise_right_shift_(31).bitwise_not_()
        x.view(torch.int32).bitwise_and_(drop)

    @staticmethod
    def _zero_at_or_above(x: torch.Tensor, ceiling, scratch: torch.Tensor) -> None:
        """Set x to +0 where |x| >= ceiling (inf zeroes nothing): the complement of _zero_below's
        rule on the same bit patterns, so (|x|bits - c bits) >> 31 is all ones exactly where |x| < c.
        ceiling: as _zero_below's threshold."""
        keep = torch.abs(x, out=scratch).view(torch.int32)
        keep.sub_(float_to_bits(ceiling) if isinstance(ceiling, float) else ceiling).bitwise_right_shift_(31)
        x.view(torch.int32).bitwise_and_(keep)

    @staticmethod
    def _disjoint_merge(contributions, weights, normalize: bool, n: int, bufs: _Buffers,
                        zero_sign: float = 1.0) -> torch.Tensor:
        # Elect: gamma = +1 where sum_i c_i >= 0, summed in model order as the reference does.
        acc, gamma, agree = bufs.acc[:n], bufs.tmp[:n], bufs.indicator[:n]
        acc.zero_()
        for c in contributions:
            acc.add_(c)
        # sign(sign(acc) + 0.5 z) maps -1, 0, +1 to -1, z, +1 for z = +-1, the sign elected where the
        # sum is 0 (acc is never -0: it starts at +0).
        torch.sign(acc, out=gamma).add_(0.5 * zero_sign).sign_()
        # Disjoint merge over A = {i : c_i != 0 and sign(c_i) = gamma} = {i : c_i * gamma > 0}.
        # clamp(c_i * gamma, 0) * gamma is c_i on A and 0 elsewhere, exactly (gamma is +-1), and
        # clamp(sign(c_i * gamma), 0) is A's indicator.
        num, den = bufs.num[:n], bufs.den[:n]
        num.zero_()
        den.zero_()
        for w, c in zip(weights, contributions):
            aligned = c.mul_(gamma)
            den.add_(torch.sign(aligned, out=agree).clamp_(min=0.0), alpha=w)   # w_i on A: exact
            num.add_(aligned.clamp_(min=0.0).mul_(gamma))
        if not normalize:
            return num
        # tau_m = num / den, and 0 where A is empty (there num is 0 too): divide by den + [den == 0].
        empty = torch.abs(den, out=agree).sign_().neg_().add_(1.0)
        return num.div_(den.add_(empty))

    def _merge_one(self, job: MergeJob, plan: ElementPlan) -> tuple[torch.Tensor | Iterator[torch.Tensor], TensorStats]:
        if job.stream:
            return self._pieces(job, plan), None
        with self._keeping_masks():
            stats = self.tensor_stats(job, plan)
            out = torch.empty(job.models[0].shape, dtype=job.out_dtype)
            out_flat = out.reshape(-1)
            with self.releasing(job):
                for s, e, piece in self._merged_chunks(job, plan, stats):
                    out_flat[s:e].copy_(piece)
        return out, stats

    def _pieces(self, job: MergeJob, plan: ElementPlan) -> Iterator[torch.Tensor]:
        """The output as consecutive flat pieces of job.out_dtype, one chunk each (job.stream)."""
        with self._keeping_masks():
            stats = self.tensor_stats(job, plan)
            with self.releasing(job):
                for _, _, piece in self._merged_chunks(job, plan, stats):
                    yield piece.to(job.out_dtype)

    def _merged_chunks(self, job: MergeJob, plan: ElementPlan, stats: TensorStats):
        """(start, end, values) of the merged output, chunk by chunk: float32 in a reused buffer,
        or where the output is an input bitwise, that input's own values (the caller casts both)."""
        if plan.uses_base and job.scale == 0.0:
            # A zero scale returns the base bitwise (b + 0 * tau would turn -0.0 into +0.0).
            base = job.base.reshape(-1)
            for s, e in self._spans(base.numel()):
                yield s, e, base[s:e]
            return
        if plan.copies_input and dtypes.of(job.models[0].dtype) in dtypes.EXACT_IN_FLOAT32:   # passthrough: as they are
            model = job.models[0].reshape(-1)
            for s, e in self._spans(model.numel()):
                if self.check_finite:
                    _check_finite(model[s:e], job.name, 0)
                yield s, e, model[s:e]
            return
        fused = self._fused(job, plan, stats)
        for s, e, bufs in self._chunks(job, plan):
            if fused is not None:
                kept = self._chunk_masks(job, plan, s, e)
                if fused.chunk(s, e, bufs.acc[:e - s], kept):
                    yield s, e, bufs.acc[:e - s]
                    continue
            result = self._merged_delta(job, plan, stats, s, e, bufs)
            if plan.uses_base:
                result.mul_(job.scale)
                result.add_(bufs.base[:e - s])
            yield s, e, result

    def merge_many(self, jobs: Iterable[MergeJob],
                   plan: ElementPlan) -> Iterator[tuple[MergeJob, torch.Tensor, TensorStats]]:
        jobs = iter(jobs)
        current = next(jobs, None)
        while current is not None:
            following = next(jobs, None)
            reader = None
            # A thread that touches the next tensor's pages pays off for large tensors only (its
            # start and join cost ~0.1 ms, more than reading a small tensor).
            # Nor for a streamed one: touching all its pages would map the whole tensor at once.
            if (self.read_ahead and following is not None and not following.stream
                    and _input_bytes(following) >= READ_AHEAD_MIN):
                inputs = [t for t in [following.base, *following.models] if t is not None]
                reader = threading.Thread(target=_touch_pages, args=(inputs,), daemon=True)
                reader.start()
            try:
                out, stats = self._merge_one(current, current.plan or plan)
                yield current, out, stats
            finally:
                if reader is not None:
                    reader.join()
            current = following
