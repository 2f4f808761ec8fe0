"""Magnitude histograms for exact TIES thresholds, and the L1 norm of sum_i tau_i.

|tau| = |f32(model) - f32(base)| is a non-negative float32, so its 32-bit pattern read as
an integer sorts exactly as the value does. Pass 1 counts every pattern in the packed
65536-bin layout of lines_fast/selection.py (high 16 bits, | 0x8000 where the low 16 bits
are not 0), for ALL N models in one launch: the base is read once, not once per model.
From it lines_fast/selection.py usually settles the exact k-th largest |tau| at once; only
for a model it does not settle does pass 2 count the low 16 bits of the elements in the one
bucket that holds the k-th value. No sort, no topk/kthvalue, and 65536 counts per model
whatever the tensor's size, so the counts also add up across tensors (global trim scope).

How the 65536-bin histogram is built on a GPU, and why this way:
- A per-program private histogram (tl.histogram) does not fit: 65536 int32 bins are 256 KB,
  more than an SM's shared memory (228 KB on H100), and tl.histogram's lowering does work
  proportional to the bin count for every warp of elements.
- So every element does one relaxed global atomic add into a single int32 histogram. Bins
  are spread over L2 slices, and the data spread over bins: the high 16 bits of a float32
  are its sign, exponent and 7 mantissa bits, so a binade spans 128 bins and a trained
  delta fills thousands of them (the hottest holds well under 1% of the elements). The one
  predictably hot bin is exact zeros (frozen or untouched weights can make most of a tensor
  0): each program counts those with a block reduction and adds them with ONE atomic.
- Cost: about one atomic per element and model, i.e. the kernel may run at the L2 atomic
  rate rather than at HBM bandwidth (bench/bench_kernels.py measures the `histogram` case).
- Counts are int32 per launch; the launcher splits launches at 2^30 elements and adds them
  into an int64 total, so no bin can overflow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lines_fast import rng
from lines_fast.selection import BINS, KEEP_NOTHING, NONZERO_LOW, locate_kth
from lines_fast.spec import kept_count

from .merge import (
    NUM_WARPS, MergePlan, default_block, kernel_view, launch_merge, load_f32, stage_models, vector_friendly_spans,
)

_MAX_LAUNCH = 1 << 30  # elements per launch: int32 counts can never overflow
# Kernels may read only constexpr globals.
_BINS = tl.constexpr(BINS)
_NONZERO_LOW = tl.constexpr(NONZERO_LOW)


@triton.jit
def _magnitude_hist_kernel(
    hist_ptr, base_ptr, models_ptr, model_stride, n_elements, bucket,
    N: tl.constexpr, REFINE: tl.constexpr, BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask, BASE_BF16)
    m_ptrs = models_ptr + offs  # advanced by the row stride: no int32 i * stride product
    for i in tl.static_range(N):
        m = load_f32(m_ptrs, mask, MODELS_BF16)
        m_ptrs += model_stride
        bits = tl.abs(m - b).to(tl.int32, bitcast=True)  # sign bit clear: >= 0, ordered as |tau|
        hi = bits >> 16
        lo = bits & 0xFFFF
        if REFINE:
            take = mask & (hi == bucket)
            key = lo
        else:
            take = mask
            key = hi | tl.where(lo != 0, _NONZERO_LOW, 0)  # the packed bin
        ones = tl.full([BLOCK], 1, dtype=tl.int32)
        # Bin 0 (exact zeros) can hold most of a tensor: count it per program, one atomic.
        tl.atomic_add(hist_ptr + i * _BINS + key, ones, mask=take & (key != 0), sem="relaxed")
        zeros = tl.sum((take & (key == 0)).to(tl.int32), axis=0)
        tl.atomic_add(hist_ptr + i * _BINS, zeros, sem="relaxed")


def launch_magnitude_histogram(hist32, base, models, *, n: int, bucket: int | None = None,
                               block: int | None = None) -> None:
    """Add the counts of elements [0, n) into int32 `hist32` [N, 65536], one row per model.

    base: flat; models: [N, stride] rows of one dtype (the staging layout). bucket None: the
    packed histogram of every model, in ONE launch (the base is read once). bucket b: the
    low 16 bits of the elements whose high bits are b (pass a single model row: N == 1).
    n must be < 2^31 (use magnitude_histogram for more: it splits).
    """
    if n == 0:
        return
    assert bucket is None or models.shape[0] == 1, "a refine pass takes one model (one bucket)"
    assert models.stride(-1) == 1 and hist32.shape == (models.shape[0], BINS)
    block = block or default_block(_magnitude_hist_kernel)
    base_k, base_bf16 = kernel_view(base)
    models_k, models_bf16 = kernel_view(models)
    for start, count in vector_friendly_spans(n, block):
        _magnitude_hist_kernel[(triton.cdiv(count, block),)](
            hist32, base_k[start:], models_k[:, start:], models.stride(0), count, -1 if bucket is None else int(bucket),
            N=models.shape[0], REFINE=bucket is not None, BASE_BF16=base_bf16, MODELS_BF16=models_bf16,
            BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False,  # nothing to fuse; says so on every Triton
        )


def magnitude_histogram(base: torch.Tensor, model: torch.Tensor, bucket: int | None = None,
                        block: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram (on the tensors' device) of |model - base|: packed, or the
    bucket's low bits. Whole tensors on the kernel's device; launches split at 2^30 elements."""
    base, model = base.reshape(-1), model.reshape(-1)
    n = base.numel()
    total = torch.zeros(BINS, dtype=torch.int64, device=base.device)
    hist32 = torch.zeros(1, BINS, dtype=torch.int32, device=base.device)
    for start in range(0, n, _MAX_LAUNCH):
        stop = min(n, start + _MAX_LAUNCH)
        hist32.zero_()
        launch_magnitude_histogram(hist32, base[start:stop], model[start:stop].unsqueeze(0), n=stop - start,
                                   bucket=bucket, block=block)
        total += hist32[0]
    return total


def task_vector_sum_l1(base: torch.Tensor, models: list[torch.Tensor], *, block: int | None = None) -> float:
    """sum_j |sum_i tau_i[j]| (untrimmed, unweighted; float32 sum in model order, float64 L1).

    The merge kernel's L1 variant with unit weights: acc + 1 * tau == acc + tau exactly.
    """
    block = block or default_block()
    base = base.reshape(-1)
    n = base.numel()
    plan = MergePlan.task_vector_sum(len(models))
    partials = torch.zeros(max(1, triton.cdiv(n, block)), dtype=torch.float64, device=base.device)
    launch_merge(None, base, stage_models(models), plan.table(None, base.device), plan, n=n,
                 stream_id=rng.tensor_stream_id(""), partials=partials, block=block)
    return float(partials.sum())


def thresholds_from_histograms(numel: int, densities, hist, refine) -> tuple[float, ...]:
    """Exact t_i = k_i-th largest |tau_i| (k_i = kept_count(density_i, numel)) for each model.

    hist: [N, 65536] packed counts (CPU). refine({i: bucket}) returns {i: low-bits histogram};
    it is called once, only for the models that pass 1 did not settle, and not at all when
    it settled every one.
    """
    located = {}
    for i, density in enumerate(densities):
        k = kept_count(density, numel)
        if k > 0:
            located[i] = locate_kth(hist[i], k)
    need = {i: found.bucket for i, found in located.items() if not found.settled}
    low_hists = refine(need) if need else {}
    return tuple(located[i].threshold(low_hists.get(i)) if i in located else KEEP_NOTHING
                 for i in range(len(densities)))


def resident_thresholds(base: torch.Tensor, models: torch.Tensor, densities, *, n: int,
                        block: int | None = None) -> tuple[tuple[float, ...], torch.Tensor]:
    """Tensor-scope TIES thresholds of tensors already on the device: (thresholds, hist CPU).

    base: flat [>= n]; models: [N, stride] staging rows. One pass-1 launch for all models,
    one copy of the counts to the host, then a refine launch only per unsettled model.
    """
    count = models.shape[0]
    hist32 = torch.zeros(count, BINS, dtype=torch.int32, device=base.device)
    launch_magnitude_histogram(hist32, base, models, n=n, block=block)
    hist = hist32.to(torch.int64).cpu()

    def refine(need: dict) -> dict:
        refined = torch.zeros(count, BINS, dtype=torch.int32, device=base.device)
        for i, bucket in need.items():
            launch_magnitude_histogram(refined[i:i + 1], base, models[i:i + 1], n=n, bucket=bucket, block=block)
        refined = refined.to(torch.int64).cpu()
        return {i: refined[i] for i in need}

    return thresholds_from_histograms(n, densities, hist, refine), hist
