"""The CPU backend: the default where there is no GPU.

It computes what lines_fast/reference.py computes, with the same float32 operations in the
same order (so election signs and DARE masks are identical, and values agree bitwise in
practice), but chunk by chunk: each tensor is walked in slices of `chunk` elements that
stay in the CPU caches, into buffers allocated once, so nothing the size of a tensor is
ever materialised in float32. Both cores are kept busy by torch's intra-op threads, and a
read-ahead thread faults in the next tensor's pages while the current one computes.
"""
from __future__ import annotations

import threading
from typing import Iterable, Iterator

import torch

from ..errors import NonFiniteInput
from ..exactsum import AbsSum
from ..rng import dare_constants, dare_uniform
from ..selection import BINS, NONZERO_LOW, float_to_bits, tensor_thresholds
from ..spec import MethodSpec
from .base import MergeJob

DEFAULT_CHUNK = 1 << 18  # 256K elements: 1 MB of float32 per buffer, cache-resident
_PAGE = 4096


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


def _touch_pages(tensors: list[torch.Tensor]) -> None:
    """Fault in the pages behind memory-mapped tensors (one byte read per page)."""
    for t in tensors:
        if t.numel():
            raw = t.reshape(-1).view(torch.uint8)
            raw[::_PAGE].sum()


class CpuBackend:
    name = "cpu"

    def __init__(self, chunk: int = DEFAULT_CHUNK, check_finite: bool = True, read_ahead: bool = True):
        self.chunk = chunk
        self.check_finite = check_finite
        self.read_ahead = read_ahead
        self._buffers: dict[int, _Buffers] = {}

    def _bufs(self, n_models: int) -> _Buffers:
        if n_models not in self._buffers:
            self._buffers[n_models] = _Buffers(n_models, self.chunk)
        return self._buffers[n_models]

    def _spans(self, numel: int):
        for start in range(0, numel, self.chunk):
            yield start, min(start + self.chunk, numel)

    # -- task vectors ---------------------------------------------------------------------
    def _load_tau(self, out: torch.Tensor, model: torch.Tensor, base_f32: torch.Tensor,
                  name: str, model_index: int) -> torch.Tensor:
        """out = float32(model) - base_f32, checking for NaN/Inf cheaply (one reduction)."""
        out.copy_(model)
        out.sub_(base_f32)
        if self.check_finite and not torch.isfinite(out.sum()):
            # The sum is non-finite if any term is (or, in theory, on overflow): look closer.
            if not torch.isfinite(base_f32).all():
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
                acc.add_(self._load_tau(bufs.tau[i][:n], m[s:e], b, "", i))
            total.add(acc)
        return total.value()

    def merged_delta_l1(self, job: MergeJob, spec: MethodSpec) -> float:
        return self._norms(job, spec, with_task_sum=False)[1]

    def delta_norms(self, job: MergeJob, spec: MethodSpec) -> tuple[float, float]:
        return self._norms(job, spec, with_task_sum=True)

    def _norms(self, job: MergeJob, spec: MethodSpec, with_task_sum: bool) -> tuple[float, float]:
        """(‖Σ τ_i‖₁ or 0.0, ‖τ_MTL‖₁): the task sum is taken from the same loaded τ_i, before
        trimming or dropping, with the same float32 adds as task_vector_sum_l1 (so equal bits)."""
        if spec.trims and job.thresholds is None:
            job.thresholds = tensor_thresholds(self, job.base, job.models, spec.densities)
        task_sum, delta = AbsSum(), AbsSum()
        for s, e, bufs in self._chunks(job):
            task_sum_chunk = bufs.task_sum[:e - s] if with_task_sum else None
            delta.add(self._merged_delta(job, spec, s, e, bufs, task_sum=task_sum_chunk))
            if with_task_sum:
                task_sum.add(task_sum_chunk)
        return task_sum.value(), delta.value()

    # -- merging --------------------------------------------------------------------------
    def _chunks(self, job: MergeJob):
        numel = job.models[0].numel()
        bufs = self._bufs(len(job.models))
        for s, e in self._spans(numel):
            yield s, e, bufs

    def _merged_delta(self, job: MergeJob, spec: MethodSpec, s: int, e: int, bufs: _Buffers,
                      task_sum: torch.Tensor | None = None) -> torch.Tensor:
        """τ_m for elements s..e (λ = 1): trimmed/dropped, elected, merged. Leaves the base in bufs.base.
        task_sum: if given, receives Σ_i τ_i (untrimmed, in model order) for α auto."""
        n = e - s
        b = bufs.base[:n]
        b.copy_(job.base.reshape(-1)[s:e])
        if task_sum is not None:
            task_sum.zero_()
        taus = []
        for i, model in enumerate(job.models):
            tau = self._load_tau(bufs.tau[i][:n], model.reshape(-1)[s:e], b, job.name, i)
            if task_sum is not None:
                task_sum.add_(tau)
            if spec.trims:
                self._trim(tau, job.thresholds[i], bufs.tmp[:n])
            if spec.drops:
                p, divisor = dare_constants(spec.densities[i])
                u = dare_uniform(spec.seed, i, job.name, n, start=s)
                tau.div_(divisor)
                # Drop where u < p: the trim's bit trick (u, p >= 0 order as their bit patterns).
                drop = u.view(torch.int32).sub_(float_to_bits(p)).bitwise_right_shift_(31).bitwise_not_()
                tau.view(torch.int32).bitwise_and_(drop)
            taus.append(tau)
        weights = spec.weights
        if spec.elects_sign:
            return self._disjoint_merge(taus, weights, spec.normalize, n, bufs)
        acc = bufs.acc[:n]
        acc.zero_()
        for w, tau in zip(weights, taus):
            acc.add_(tau if w == 1.0 else tau.mul_(w))
        if spec.method == "linear":  # linear with LiNeS: the weighted mean of the task vectors
            acc.div_(sum(weights))
        return acc

    @staticmethod
    def _trim(tau: torch.Tensor, threshold: float, scratch: torch.Tensor) -> None:
        """Keep |tau| >= threshold (ties at the threshold kept), set the rest to +0; inf keeps nothing.

        Done on the bit patterns, which order as the magnitudes: (|tau|bits - t bits) >> 31 is
        all ones where |tau| < t, and ANDing tau with its complement zeroes exactly those. No
        bool tensors: comparisons and masked_fill cost 4-7x a float op per chunk on CPU.
        """
        drop = torch.abs(tau, out=scratch).view(torch.int32)
        drop.sub_(float_to_bits(threshold)).bitwise_right_shift_(31).bitwise_not_()
        tau.view(torch.int32).bitwise_and_(drop)

    @staticmethod
    def _disjoint_merge(taus, weights, normalize: bool, n: int, bufs: _Buffers) -> torch.Tensor:
        # Elect: gamma = +1 where sum_i w_i tau_i >= 0, summed in model order as the reference does.
        acc, gamma, agree = bufs.acc[:n], bufs.tmp[:n], bufs.indicator[:n]
        acc.zero_()
        for w, tau in zip(weights, taus):
            acc.add_(tau if w == 1.0 else torch.mul(tau, w, out=gamma))
        # sign(sign(acc) + 0.5) maps -1, 0, +1 to -1, +1, +1 (acc is never -0: it starts at +0).
        torch.sign(acc, out=gamma).add_(0.5).sign_()
        # Disjoint merge over A = {i : tau_i != 0 and sign(tau_i) = gamma} = {i : tau_i * gamma > 0}.
        # clamp(tau_i * gamma, 0) * gamma is tau_i on A and 0 elsewhere, exactly (gamma is +-1), and
        # clamp(sign(tau_i * gamma), 0) is A's indicator.
        num, den = bufs.num[:n], bufs.den[:n]
        num.zero_()
        den.zero_()
        for w, tau in zip(weights, taus):
            aligned = tau.mul_(gamma)
            den.add_(torch.sign(aligned, out=agree).clamp_(min=0.0), alpha=w)   # w_i on A: exact
            kept = aligned.clamp_(min=0.0).mul_(gamma)
            num.add_(kept if w == 1.0 else kept.mul_(w))
        if not normalize:
            return num
        # tau_m = num / den, and 0 where A is empty (there num is 0 too): divide by den + [den == 0].
        empty = torch.abs(den, out=agree).sign_().neg_().add_(1.0)
        return num.div_(den.add_(empty))

    def _merge_one(self, job: MergeJob, spec: MethodSpec) -> torch.Tensor:
        if spec.trims and job.thresholds is None:
            job.thresholds = tensor_thresholds(self, job.base, job.models, spec.densities)
        if spec.uses_base and job.scale == 0.0:
            # A zero scale returns the base bitwise (b + 0 * tau would turn -0.0 into +0.0).
            return job.base.to(job.out_dtype, copy=True)
        out = torch.empty(job.models[0].shape, dtype=job.out_dtype)
        out_flat = out.reshape(-1)
        for s, e, bufs in self._chunks(job):
            n = e - s
            if not spec.uses_base:
                result = self._linear_chunk(job, spec, s, e, bufs)
            else:
                result = self._merged_delta(job, spec, s, e, bufs)
                result.mul_(job.scale)
                result.add_(bufs.base[:n])
            out_flat[s:e].copy_(result)
        return out

    def _linear_chunk(self, job: MergeJob, spec: MethodSpec, s: int, e: int, bufs: _Buffers) -> torch.Tensor:
        """Plain linear (model soup): sum_i w_i θ_i, divided by sum_i w_i when normalizing."""
        n = e - s
        acc = bufs.acc[:n]
        acc.zero_()
        for i, (w, model) in enumerate(zip(spec.weights, job.models)):
            theta = bufs.tau[i][:n]
            theta.copy_(model.reshape(-1)[s:e])
            if self.check_finite and not torch.isfinite(theta.sum()):
                raise NonFiniteInput(job.name, i)
            acc.add_(theta if w == 1.0 else theta.mul_(w))
        if spec.normalize:
            acc.div_(sum(spec.weights))
        return acc

    def merge_many(self, jobs: Iterable[MergeJob], spec: MethodSpec) -> Iterator[tuple[MergeJob, torch.Tensor]]:
        jobs = iter(jobs)
        current = next(jobs, None)
        while current is not None:
            following = next(jobs, None)
            reader = None
            if self.read_ahead and following is not None:
                inputs = [t for t in [following.base, *following.models] if t is not None]
                reader = threading.Thread(target=_touch_pages, args=(inputs,), daemon=True)
                reader.start()
            try:
                yield current, self._merge_one(current, spec)
            finally:
                if reader is not None:
                    reader.join()
            current = following
