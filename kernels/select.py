"""Magnitude histograms for exact TIES thresholds, and the L1 norm of sum_i tau_i.

|tau| = |f32(model) - f32(base)| is a non-negative float32, so its 32-bit pattern read as
an integer sorts exactly as the value does. Pass 1 counts the high 16 bits of every
pattern (65536 bins); pass 2 counts the low 16 bits of the elements whose high 16 bits
equal one chosen bucket. From the two, lines_fast/selection.py finds the exact k-th
largest |tau|: no sort, no topk/kthvalue, and 2 x 65536 counts per model whatever the
tensor's size, so the counts also add up across tensors (global trim scope).

Pass 1 also reports whether ANY element had nonzero low 16 bits (one atomic max per
program). When none had, every element of every bucket has low bits 0, pass 2 is known
without reading the data again, and the caller skips it.

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
- Cost: about one atomic per element, i.e. the kernel runs at the L2 atomic rate rather
  than at HBM bandwidth. Even so it handles billions of elements per second, far ahead of
  the NVMe reads that bound a 70B merge (see bench/bench_kernels.py for the measured rate).
- Counts are int32 per launch; the launcher splits launches at 2^30 elements and adds them
  into an int64 total, so no bin can overflow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lines_fast import rng
from lines_fast.selection import KEEP_NOTHING, bits_to_float, locate
from lines_fast.spec import kept_count

from .merge import (
    NUM_WARPS, MergePlan, default_block, kernel_view, launch_merge, load_f32, stage_models,
)

BINS = 1 << 16
_MAX_LAUNCH = 1 << 30  # elements per launch: int32 counts can never overflow
# Patterns >= 0x7F800000 are Inf/NaN: their high bits are bins >= 0x7F80.
NONFINITE_BIN = 0x7F80


@triton.jit
def _magnitude_hist_kernel(
    hist_ptr, lowbits_ptr, base_ptr, model_ptr, n_elements, bucket,
    REFINE: tl.constexpr, BASE_BF16: tl.constexpr, MODEL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask, BASE_BF16)
    m = load_f32(model_ptr + offs, mask, MODEL_BF16)
    bits = tl.abs(m - b).to(tl.int32, bitcast=True)  # sign bit clear: >= 0, ordered as |tau|
    hi = bits >> 16
    lo = bits & 0xFFFF
    if REFINE:
        take = mask & (hi == bucket)
        key = lo
    else:
        take = mask
        key = hi
        # Any nonzero low bits in this block? (max of 16-bit values: one atomic per program)
        tl.atomic_max(lowbits_ptr, tl.max(tl.where(mask, lo, 0), axis=0), sem="relaxed")
    ones = tl.full([BLOCK], 1, dtype=tl.int32)
    # Bin 0 (exact zeros) can hold most of a tensor: count it per program, one atomic.
    tl.atomic_add(hist_ptr + key, ones, mask=take & (key != 0), sem="relaxed")
    zeros = tl.sum((take & (key == 0)).to(tl.int32), axis=0)
    tl.atomic_add(hist_ptr, zeros, sem="relaxed")


def launch_magnitude_histogram(hist32, lowbits, base, model, *, n: int, bucket: int | None = None,
                               block: int | None = None) -> None:
    """Add the counts of elements [0, n) of flat `base`/`model` into int32 `hist32` [65536].

    bucket None: high 16 bits, and `lowbits` (int32 [1]) is max-ed with the low 16 bits
    seen (0 means all were zero). bucket b: the low 16 bits of elements whose high bits are b.
    n must be < 2^31 (use magnitude_histogram for more: it splits).
    """
    if n == 0:
        return
    block = block or default_block(_magnitude_hist_kernel)
    base_k, base_bf16 = kernel_view(base)
    model_k, model_bf16 = kernel_view(model)
    _magnitude_hist_kernel[(triton.cdiv(n, block),)](
        hist32, lowbits if lowbits is not None else hist32, base_k, model_k, n,
        -1 if bucket is None else int(bucket),
        REFINE=bucket is not None, BASE_BF16=base_bf16, MODEL_BF16=model_bf16, BLOCK=block,
        num_warps=NUM_WARPS,
    )


def magnitude_histogram(base: torch.Tensor, model: torch.Tensor, bucket: int | None = None,
                        block: int | None = None) -> tuple[torch.Tensor, bool]:
    """(int64 [65536] histogram on the tensors' device, low_bits_all_zero) of |model - base|.

    Whole tensors on the kernel's device; launches are split at 2^30 elements. With a
    bucket, low_bits_all_zero is meaningless (returned False).
    """
    base, model = base.reshape(-1), model.reshape(-1)
    n = base.numel()
    total = torch.zeros(BINS, dtype=torch.int64, device=base.device)
    hist32 = torch.zeros(BINS, dtype=torch.int32, device=base.device)
    lowbits = torch.zeros(1, dtype=torch.int32, device=base.device)
    for start in range(0, n, _MAX_LAUNCH):
        stop = min(n, start + _MAX_LAUNCH)
        hist32.zero_()
        launch_magnitude_histogram(hist32, lowbits, base[start:stop], model[start:stop], n=stop - start,
                                   bucket=bucket, block=block)
        total += hist32
    return total, bucket is None and int(lowbits.item()) == 0


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


def thresholds_from_histograms(numel: int, densities, hist_hi, lowbits, refine) -> tuple[float, ...]:
    """Exact t_i = k_i-th largest |tau_i| (k_i = kept_count(density_i, numel)) for each model.

    hist_hi: [N, 65536] high-bits counts (CPU). lowbits[i] == 0 means model i's low 16 bits
    were all zero, so the pattern is bucket << 16 without a refine pass. refine({i: bucket})
    returns {i: low-bits histogram}; it is called once, only for the models that need it.
    """
    located = {}
    for i, density in enumerate(densities):
        k = kept_count(density, numel)
        if k > 0:
            located[i] = locate(hist_hi[i], k)
    need = {i: bucket for i, (bucket, _) in located.items() if int(lowbits[i]) != 0}
    low_hists = refine(need) if need else {}
    thresholds = []
    for i in range(len(densities)):
        if i not in located:
            thresholds.append(KEEP_NOTHING)
            continue
        bucket, rank = located[i]
        low = locate(low_hists[i], rank)[0] if i in need else 0
        thresholds.append(bits_to_float((bucket << 16) | low))
    return tuple(thresholds)


def resident_thresholds(base: torch.Tensor, models: torch.Tensor, densities, *, n: int,
                        block: int | None = None) -> tuple[tuple[float, ...], torch.Tensor]:
    """Tensor-scope TIES thresholds of tensors already on the device: (thresholds, hist_hi CPU).

    base: flat [>= n]; models: [N, stride] staging rows. Pass 1 for every model, one copy of
    the counts to the host, then pass 2 only for models whose low bits were not all zero.
    """
    count = models.shape[0]
    hist32 = torch.zeros(count, BINS, dtype=torch.int32, device=base.device)
    lowbits = torch.zeros(count, dtype=torch.int32, device=base.device)
    for i in range(count):
        launch_magnitude_histogram(hist32[i], lowbits[i:i + 1], base, models[i], n=n, block=block)
    hist, low = hist32.to(torch.int64).cpu(), lowbits.cpu()

    def refine(need: dict) -> dict:
        refined = torch.zeros(count, BINS, dtype=torch.int32, device=base.device)
        for i, bucket in need.items():
            launch_magnitude_histogram(refined[i], None, base, models[i], n=n, bucket=bucket, block=block)
        refined = refined.to(torch.int64).cpu()
        return {i: refined[i] for i in need}

    return thresholds_from_histograms(n, densities, hist, low, refine), hist
