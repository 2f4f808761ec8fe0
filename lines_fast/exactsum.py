"""Exact, order-independent sums of |x| over float32 tensors (LiNeS α auto's L1 norms).

A float32 magnitude is m * 2^(max(E, 1) - 150) with E its 8 exponent bits and m its 24-bit
significand (hidden bit included for normal numbers). Summing m per exponent in int64 is
exact and associative, so the total does not depend on chunking, thread count or order;
the one rounding happens at the end, in Python's exact integer-to-float division. An int64
bin holds 2^39 significands: more elements than any model has.
"""
from __future__ import annotations

import torch

_EXPONENTS = 256
_MAX_ADD = 1 << 28  # elements per bincount: each float64 bin sum stays below 2^52, exact


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, m) of |x| for float32 x: exponent bits and significand, hidden bit included for normals."""
    bits = x.abs().view(torch.int32)
    exponent = bits >> 23
    return exponent, (bits & 0x7FFFFF) | (exponent.clamp(max=1) << 23)


class AbsSum:
    def __init__(self) -> None:
        self.bins = torch.zeros(_EXPONENTS, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        """Add sum |x| for a float32 tensor without NaN/Inf, on any device. (On a GPU the
        float64 bin sums are atomics in any order, still exact: every partial sum is an
        integer below 2^53.)"""
        flat = x.reshape(-1)
        if flat.device.type == "cpu" and flat.numel():
            from . import jit

            fast = jit.compiled(flat.numel())
            if fast is not None:   # the same integer sums, compiled (lines_fast/jit.py)
                bins = torch.zeros(_EXPONENTS, dtype=torch.int64)
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
                                    minlength=_EXPONENTS).to(torch.int64).cpu()

    def value(self) -> float:
        total = sum(int(count) << max(e, 1) - 1 for e, count in enumerate(self.bins.tolist()) if count)
        return total / (1 << 149)   # correctly rounded


def row_abs_sums(x: torch.Tensor) -> list[float]:
    """sum |x[r]| of each row of a float32 [R, L] CPU tensor without NaN/Inf, each exactly as
    AbsSum gives it: per-exponent integer sums of significands (L < 2^39), each times its power of
    two an exact float64 term, the terms added by math.fsum (correctly rounded, as AbsSum.value)."""
    import math

    rows, length = x.shape
    exponent, significand = _split(x)
    low, high = int(exponent.min()) if x.numel() else 0, int(exponent.max()) if x.numel() else 0
    width = high - low + 1
    index = (torch.arange(rows).unsqueeze(1) * width + (exponent - low)).reshape(-1)
    bins = torch.zeros(rows * width, dtype=torch.int64).index_add_(0, index, significand.reshape(-1).long())
    scale = torch.tensor([2.0 ** (max(e, 1) - 150) for e in range(low, high + 1)], dtype=torch.float64)
    terms = (bins.view(rows, width).double() * scale).tolist()
    return [math.fsum(t) for t in terms]
