"""Exact, order-independent sums of |x| over float32 tensors (LiNeS α auto's L1 norms).

A float32 magnitude is m * 2^(max(E, 1) - 150) with E its 8 exponent bits and m its 24-bit
significand (hidden bit included for normal numbers). Summing m per exponent in int64 is
exact and associative, so the total does not depend on chunking, thread count or order;
the one rounding happens at the end, in Python's exact integer-to-float division. An int64
bin holds 2^39 significands: more elements than any model has.
"""
from __future__ import annotations

import math

from .lazy import torch

EXPONENT_BINS = 256   # one int64 bin per float32 exponent
_MAX_ADD = 1 << 28  # elements per bincount: each float64 bin sum stays below 2^52, exact


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, m) of |x| for float32 x: exponent bits and significand, hidden bit included for normals."""
    bits = x.abs().view(torch.int32)
    exponent = bits >> 23
    return exponent, (bits & 0x7FFFFF) | (exponent.clamp(max=1) << 23)


class AbsSum:
    def __init__(self) -> None:
        self.bins = torch.zeros(EXPONENT_BINS, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        """Add sum |x| for a float32 tensor without NaN/Inf, on any device. (On a GPU the
        float64 bin sums are atomics in any order, still exact: every partial sum is an
        integer below 2^53.)"""
        flat = x.reshape(-1)
        if flat.device.type == "cpu" and flat.numel():
            from . import jit

            fast = jit.compiled(flat.numel())
            if fast is not None:   # the same integer sums, compiled (lines_fast/jit.py)
                bins = torch.zeros(EXPONENT_BINS, dtype=torch.int64)
                fast.add_abs_bins(flat.contiguous().view(torch.int32).numpy(), bins.numpy())
                self.bins += bins
                return
        if flat.numel() > _MAX_ADD:
            for start in range(0, flat.numel(), _MAX_ADD):
                self.add(flat[start:start + _MAX_ADD])
            return
        exponent, significand = _split(flat)
        # Each bin's float64 sum is exact: fewer than 2^29 significands of < 2^24 per call.
        self.bins += torch.bincount(exponent.reshape(-1), weights=significand.reshape(-1).double(),
                                    minlength=EXPONENT_BINS).to(torch.int64).cpu()

    def add_bins(self, bins: torch.Tensor) -> None:
        """Add integer bins counted elsewhere the same way (jit_kernels.add_abs_bins_kept)."""
        self.bins += bins

    def value(self) -> float:
        """The sum, correctly rounded; inf if an Inf or NaN was added (its exponent bits are all
        ones), so the caller sees a non-finite norm, not a huge finite one."""
        if self.bins[EXPONENT_BINS - 1]:
            return math.inf
        total = sum(int(count) << max(e, 1) - 1 for e, count in enumerate(self.bins.tolist()) if count)
        return total / (1 << 149)   # correctly rounded


_LIMB_SHIFT = 4
_LIMB_BITS = 1 << _LIMB_SHIFT   # 16


def row_abs_sums(x: torch.Tensor) -> list[float]:
    """sum |x[r]| of each row of a float32 [R, L] CPU tensor without NaN/Inf (L < 2^23), each
    exactly as AbsSum gives it. Row r's sum is the integer S_r = sum_j m_j 2^(E_j - low) times
    2^(low - 150), with E_j = max(E_j, 1) (a subnormal has the scale of E = 1); S_r is gathered
    in 16-bit limbs, each an exact int64 sum of significands shifted by < 16 bits, and put
    together in Python integers, whose division by the power of two rounds correctly: one
    small list per row, not one float per exponent (packs of 10^4 tensors)."""
    rows, length = x.shape
    if length >= 1 << 23:
        raise ValueError(f"rows of {length} elements: row_abs_sums takes fewer than 2^23")
    if x.numel() == 0:
        return [0.0] * rows
    exponent, significand = _split(x)
    exponent = exponent.clamp_(min=1)
    low = int(exponent.min())
    offset = exponent.sub_(low)
    limbs = int(offset.max()) // _LIMB_BITS + 1
    # significand (< 2^24) << (< 16) < 2^40 per element; fewer than 2^23 of them per limb: < 2^63.
    shifted = significand.long().bitwise_left_shift_(offset & (_LIMB_BITS - 1))
    index = (torch.arange(rows).unsqueeze(1) * limbs + (offset >> _LIMB_SHIFT)).reshape(-1)
    sums = torch.zeros(rows * limbs, dtype=torch.int64).index_add_(0, index, shifted.reshape(-1))
    scale_shift = 150 - low
    out = []
    for row in sums.view(rows, limbs).tolist():
        total = 0
        for k in range(limbs - 1, -1, -1):
            total = (total << _LIMB_BITS) + row[k]
        out.append(total / (1 << scale_shift) if scale_shift >= 0 else float(total << -scale_shift))
    return out
