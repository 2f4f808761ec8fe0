"""Exact k-th largest magnitude from histograms of float32 bit patterns.

|tau| is a non-negative float32, so its 32-bit pattern read as an unsigned integer sorts
exactly as the value does. A backend counts the high 16 bits of every pattern (65536 bins);
`locate` finds the bin that holds the k-th largest and how deep into that bin it lies; the
backend then counts the low 16 bits of the elements in that one bin, and `locate` on that
second histogram gives the exact pattern. No sort, and the statistics are 2 x 65536 counts
per model whatever the model's size, so they also work across all tensors (global scope).
"""
from __future__ import annotations

import struct

import torch

BINS = 1 << 16
KEEP_NOTHING = float("inf")  # the threshold for k = 0: no |tau| is >= inf


def locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, rank): the bin holding the k-th largest element, and its 1-based rank inside that bin from the top.

    hist counts elements per bin, bins ordered by value. 1 <= k <= hist.sum().
    """
    from_top = torch.cumsum(hist.flip(0).to(torch.int64), 0)
    total = int(from_top[-1])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=torch.int64)))
    above = int(from_top[position - 1]) if position > 0 else 0
    return hist.numel() - 1 - position, k - above


def bits_to_float(bits: int) -> float:
    """The float32 whose bit pattern is `bits`, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def float_to_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def threshold_from_histograms(hist_hi: torch.Tensor, k: int, refine) -> float:
    """The k-th largest |tau| (a float32 value), given the high-bits histogram and a callable
    `refine(bucket) -> low-bits histogram of the elements in that bucket`.

    k = 0 keeps nothing and returns KEEP_NOTHING without calling refine.
    """
    if k == 0:
        return KEEP_NOTHING
    bucket, rank = locate(hist_hi, k)
    low, _ = locate(refine(bucket), rank)
    return bits_to_float((bucket << 16) | low)


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """int32 view of |tau| (float32, contiguous): non-negative, ordered as the magnitudes."""
    return tau.abs().view(torch.int32)


def tensor_thresholds(histogram, base: torch.Tensor, models: list[torch.Tensor],
                      densities: tuple[float, ...]) -> tuple[float, ...]:
    """Tensor-scope trim thresholds t_i, one per model, from a backend's `magnitude_histogram`."""
    from .spec import kept_count

    thresholds = []
    for model, density in zip(models, densities):
        k = kept_count(density, base.numel())
        if k == 0:
            thresholds.append(KEEP_NOTHING)
            continue
        hist_hi = histogram(base, model)
        thresholds.append(threshold_from_histograms(hist_hi, k, lambda b, m=model: histogram(base, m, b)))
    return tuple(thresholds)
