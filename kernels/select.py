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
- A private copy per program does not fit: 65536 int32 bins are 256 KB, more than an SM's
  shared memory (228 KB on H100), and tl.histogram's lowering does work proportional to the
  bin count for every warp of elements. So most elements do one relaxed global atomic add
  into a single int32 histogram: bins are spread over L2 slices.
- But bf16 task vectors are made of a few exact values: tau = m - b is a small multiple of
  the base's ulp, so |tau| = 1 ulp of each binade of the base is one bin each, and zeros are
  another. On bench/bench_kernels.py's data the hottest nonzero bin holds 21% of the
  elements and exact zeros 22%; trained bf16 deltas look alike. Same-address atomics are
  serialized in L2, so global atomics alone would run tens of times below bandwidth.
- Hence hot bins are privatized: a sampling launch (SAMPLE_BLOCKS spread blocks) finds the
  HOT_SLOTS most frequent bins (bin 0 always among them); a 65536-entry int16 table maps
  each bin to its slot or -1. In the full pass an element of a hot bin is counted in the
  program's own tl.histogram over the slots, added to the global counts once per program
  (ITERS blocks); only the other, cold elements use global atomics. Every element is
  counted exactly once whichever path it takes, so the table only decides speed, never the
  counts (tests give the kernel arbitrary tables).
- tl.histogram costs about log2(slots) + 8 * slots / 32 warp instructions per 32 elements,
  so more slots trade compute for less contention: 64 slots, 8 blocks per program and 4
  warps are guesses to be tuned on a GPU (bench/bench_kernels.py sweeps them).
- Counts are int32 per launch; the launcher splits launches at 2^30 elements and adds them
  into an int64 total, so no bin can overflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lines_fast import rng
from lines_fast.selection import BINS, NONZERO_LOW, thresholds_of_ranks

from lines_fast.plan import ElementPlan, TensorStats

from .merge import (
    NUM_WARPS, _interpreted, default_block, kernel_view, launch_merge, load_f32, stage_models,
    vector_friendly_spans,
)

_MAX_LAUNCH = 1 << 30  # elements per launch: int32 counts can never overflow
HOT_SLOTS = 64         # bins counted privately per program (tl.histogram's cost grows with it)
ITERS = 8              # blocks per program on a GPU: one private flush per 8192 elements
SAMPLE_BLOCKS = 32     # blocks the sampling launch reads to find the hot bins (32K elements)
SAMPLE_MIN_ELEMENTS = 1 << 22  # below this, ~10 small device ops of sampling outweigh contention
# Kernels may read only constexpr globals.
_NONZERO_LOW = tl.constexpr(NONZERO_LOW)


@triton.jit
def _magnitude_hist_kernel(
    hist_ptr, slot_of_bin_ptr, bin_of_slot_ptr, base_ptr, models_ptr, model_stride, n_elements,
    block_stride, hist_row_stride, bucket,
    N: tl.constexpr, NP: tl.constexpr, REFINE: tl.constexpr, BASE_BF16: tl.constexpr,
    MODELS_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, HOT: tl.constexpr,
):
    # Program p counts ITERS consecutive blocks from element p * block_stride (block_stride =
    # ITERS * BLOCK for a full pass; larger for the sampling launch). Model i's counts go to
    # row i (hist_row_stride = 65536), or all into one row (0: the sampling launch).
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    rows = tl.arange(0, NP)  # one row of private hot-slot counts per model (NP = pow2 >= N)
    private = tl.zeros([NP, HOT], dtype=tl.int32)
    ones = tl.full([BLOCK], 1, dtype=tl.int32)
    for it in range(ITERS):
        offs = pid * block_stride + it * BLOCK + lanes
        mask = offs < n_elements
        b = load_f32(base_ptr + offs, mask, BASE_BF16)  # read once for all N models
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
            slot = tl.load(slot_of_bin_ptr + key, mask=take, other=-1).to(tl.int32)  # 128 KB table: L1/L2
            hot = take & (slot >= 0)
            tl.atomic_add(hist_ptr + i * hist_row_stride + key, ones, mask=take & (slot < 0), sem="relaxed")
            counts = tl.histogram(tl.where(hot, slot, 0), HOT, mask=hot)
            private += tl.where(rows[:, None] == i, counts[None, :], 0)
    bins = tl.load(bin_of_slot_ptr + tl.arange(0, HOT))
    for i in tl.static_range(N):
        counts = tl.sum(tl.where(rows[:, None] == i, private, 0), axis=0)
        tl.atomic_add(hist_ptr + i * hist_row_stride + bins, counts, mask=counts != 0, sem="relaxed")


@dataclass(frozen=True)
class HotBins:
    """Which bins a histogram launch counts privately: slot_of_bin int16 [65536] (-1: global
    atomics) and bin_of_slot int32 [slots], both on the kernel's device."""

    slot_of_bin: torch.Tensor
    bin_of_slot: torch.Tensor

    @property
    def slots(self) -> int:
        return self.bin_of_slot.numel()

    @classmethod
    def of(cls, bins: torch.Tensor) -> "HotBins":
        """Privatize exactly `bins` (distinct bin numbers on the device; a power-of-2 count >= 32)."""
        slots = bins.numel()
        # tl.histogram's GPU lowering gives each lane of a warp slots / 32 bins.
        assert slots >= 32 and slots & (slots - 1) == 0, "tl.histogram needs a power of 2, at least 32"
        slot_of_bin = torch.full((BINS,), -1, dtype=torch.int16, device=bins.device)
        slot_of_bin[bins.long()] = torch.arange(slots, dtype=torch.int16, device=bins.device)
        return cls(slot_of_bin, bins.to(torch.int32))

    @classmethod
    def lowest(cls, device, slots: int = HOT_SLOTS) -> "HotBins":
        """Bins 0 .. slots-1: bin 0 (exact zeros; low bits 0 in a refine) is the hot one."""
        key = (torch.device(device), slots)
        if key not in _LOWEST:
            _LOWEST[key] = cls.of(torch.arange(slots, device=key[0]))
        return _LOWEST[key]


_LOWEST: dict = {}  # (device, slots) -> HotBins.lowest, built once


def _launch(hist32, hot: HotBins, base_k, base_bf16, models_k, models_bf16, *, n: int, bucket, block: int,
            iters: int, programs: int, block_stride: int, num_warps: int = NUM_WARPS) -> None:
    """One launch; hist32 [N, 65536], or [1, 65536] to add every model's counts into one row."""
    count = models_k.shape[0]
    _magnitude_hist_kernel[(programs,)](
        hist32, hot.slot_of_bin, hot.bin_of_slot, base_k, models_k, models_k.stride(0), n, block_stride,
        BINS if hist32.shape[0] == count else 0, -1 if bucket is None else int(bucket),
        N=count, NP=triton.next_power_of_2(count), REFINE=bucket is not None, BASE_BF16=base_bf16,
        MODELS_BF16=models_bf16, BLOCK=block, ITERS=iters, HOT=hot.slots,
        num_warps=num_warps, enable_fp_fusion=False,  # nothing to fuse; says so on every Triton
    )


def sample_hot_bins(base, models, *, n: int, block: int, slots: int = HOT_SLOTS) -> HotBins:
    """The `slots` bins most frequent in SAMPLE_BLOCKS blocks spread over [0, n), bin 0 first.

    Choosing among 65536 bin counts (not among the data) with topk is cheap and only decides
    which elements are counted privately; the counts stay exact whatever it picks.
    """
    base_k, base_bf16 = kernel_view(base)
    models_k, models_bf16 = kernel_view(models)
    device = base.device
    popularity = torch.zeros(1, BINS, dtype=torch.int32, device=device)  # all models in one row
    stride = max(block, (n // SAMPLE_BLOCKS) // block * block)
    _launch(popularity, HotBins.lowest(device), base_k, base_bf16, models_k, models_bf16, n=n, bucket=None,
            block=block, iters=1, programs=min(SAMPLE_BLOCKS, triton.cdiv(n, stride)), block_stride=stride)
    popularity[0, 0] = 2**31 - 1  # exact zeros: privatized whatever the sample says
    return HotBins.of(torch.topk(popularity[0], slots).indices)


def launch_magnitude_histogram(hist32, base, models, *, n: int, bucket: int | None = None,
                               block: int | None = None, iters: int | None = None,
                               hot: HotBins | None = None, num_warps: int = NUM_WARPS) -> None:
    """Add the counts of elements [0, n) into int32 `hist32` [N, 65536], one row per model.

    base: flat; models: [N, stride] rows of one dtype (the staging layout). bucket None: the
    packed histogram of every model, in ONE launch (the base is read once). bucket b: the
    low 16 bits of the elements whose high bits are b (pass a single model row: N == 1).
    hot: the privatized bins; by default sampled for a big pass 1, else bins 0..HOT_SLOTS-1.
    iters, num_warps: blocks per program and warps (tuning; bench/bench_kernels.py sweeps them).
    n must be < 2^31 (use magnitude_histogram for more: it splits).
    """
    if n == 0:
        return
    assert bucket is None or models.shape[0] == 1, "a refine pass takes one model (one bucket)"
    assert models.stride(-1) == 1 and hist32.shape == (models.shape[0], BINS)
    interpreted = _interpreted(_magnitude_hist_kernel)
    block = block or default_block(_magnitude_hist_kernel)
    iters = iters or (1 if interpreted else ITERS)
    if hot is None:
        big = bucket is None and n >= SAMPLE_MIN_ELEMENTS
        hot = sample_hot_bins(base, models, n=n, block=block) if big else HotBins.lowest(base.device)
    base_k, base_bf16 = kernel_view(base)
    models_k, models_bf16 = kernel_view(models)
    for start, count in vector_friendly_spans(n, block):
        _launch(hist32, hot, base_k[start:], base_bf16, models_k[:, start:], models_bf16, n=count, bucket=bucket,
                block=block, iters=iters, programs=triton.cdiv(count, block * iters), block_stride=block * iters,
                num_warps=num_warps)


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
    plan = ElementPlan.task_vector_sum(len(models))
    partials = torch.zeros(max(1, triton.cdiv(n, block)), dtype=torch.float64, device=base.device)
    launch_merge(None, base, stage_models(models), plan.table(TensorStats(), base.device), plan, n=n,
                 stream_id=rng.tensor_stream_id(""), partials=partials, block=block)
    return float(partials.sum())


def resident_thresholds(base: torch.Tensor, models: torch.Tensor, ranks, *, n: int,
                        block: int | None = None) -> tuple[list[tuple[float, ...]], torch.Tensor]:
    """Tensor-scope magnitude thresholds of tensors already on the device, per model one per
    rank in ranks[i] (ElementPlan.magnitude_ranks): (thresholds, hist CPU).

    base: flat [>= n]; models: [N, stride] staging rows. One pass-1 launch for all models,
    one copy of the counts to the host, then a refine launch only per unsettled model.
    """
    hist32 = torch.zeros(models.shape[0], BINS, dtype=torch.int32, device=base.device)
    launch_magnitude_histogram(hist32, base, models, n=n, block=block)
    hist = hist32.to(torch.int64).cpu()

    def refine(i: int, bucket: int) -> torch.Tensor:
        low = torch.zeros(1, BINS, dtype=torch.int32, device=base.device)
        launch_magnitude_histogram(low, base, models[i:i + 1], n=n, bucket=bucket, block=block)
        return low[0].to(torch.int64).cpu()

    return thresholds_of_ranks(hist, ranks, refine), hist
