"""Exact k-th largest magnitude from histograms of float32 bit patterns.

|tau| is a non-negative float32, so its 32-bit pattern read as an unsigned integer sorts
exactly as the value does, and its sign bit is 0: the high 16 bits ("bucket") lie in
0..0x7FFF. A backend's first pass counts every pattern in a PACKED 65536-bin histogram:

    bin = bucket                 when the low 16 bits are all 0
    bin = bucket | 0x8000        when they are not

So one histogram gives both the bucket counts (bin b plus bin b | 0x8000) and, per bucket,
how many elements have nonzero low bits. `locate` finds the bucket holding the k-th largest
and its rank inside the bucket from the top. Inside a bucket every element with nonzero
low bits is larger than every element without, so when the rank passes the bucket's count
of nonzero-low elements, the k-th largest has low bits 0 and is exactly bucket << 16: the
threshold is known after ONE pass. Only otherwise does the backend count the low 16 bits
of that one bucket's elements (a refine pass). bf16 and fp16 deltas almost always end in
the first case (their task vectors rarely need more than 16 significant bits).

No sort, and the statistics are 65536 counts per model whatever the model's size, so they
also add up across tensors (global scope).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .lazy import torch

BINS = 1 << 16
BUCKETS = 1 << 15        # high 16 bits of a non-negative float32: 0 .. 0x7FFF
NONZERO_LOW = 1 << 15    # packed-bin flag: the element's low 16 bits are not all 0
NONFINITE_BUCKET = 0x7F80  # buckets >= this hold Inf/NaN magnitudes
KEEP_NOTHING = float("inf")  # the threshold for k = 0: no |tau| is >= inf


def packed_bins(bits: torch.Tensor) -> torch.Tensor:
    """The packed-histogram bin of each non-negative int32 pattern (the definition above)."""
    return (bits >> 16) | torch.where((bits & 0xFFFF) != 0, NONZERO_LOW, 0)


def unpack(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-bucket counts, per-bucket counts of nonzero-low elements) of a packed histogram [..., BINS]."""
    nonzero_low = hist[..., NONZERO_LOW:]
    return hist[..., :NONZERO_LOW] + nonzero_low, nonzero_low


def nonfinite_count(hist: torch.Tensor) -> int:
    """How many magnitudes a packed histogram counted as Inf/NaN."""
    buckets, _ = unpack(hist)
    return int(buckets[..., NONFINITE_BUCKET:].sum())


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


@dataclass(frozen=True)
class Located:
    """Where the k-th largest |tau| lies after the first pass.

    bucket: its high 16 bits; rank: 1-based from the top inside the bucket. settled: the
    rank passes the bucket's nonzero-low count, so the value is exactly bucket << 16.
    """

    bucket: int
    rank: int
    settled: bool

    def threshold(self, low_hist: torch.Tensor | None = None) -> float:
        """The exact threshold; an unsettled one needs the bucket's low-bits histogram."""
        if self.settled:
            return bits_to_float(self.bucket << 16)
        if low_hist is None:
            raise ValueError(f"bucket {self.bucket:#x} needs its low-bits histogram (a refine pass)")
        low, _ = locate(low_hist, self.rank)
        return bits_to_float((self.bucket << 16) | low)


def locate_kth(hist: torch.Tensor, k: int) -> Located:
    """Locate the k-th largest magnitude (1 <= k <= count) in a packed histogram."""
    buckets, nonzero_low = unpack(hist)
    bucket, rank = locate(buckets, k)
    return Located(bucket, rank, settled=rank > int(nonzero_low[bucket]))


def threshold_from_histograms(hist: torch.Tensor, k: int, refine) -> float:
    """The k-th largest |tau| (a float32 value), given the packed histogram and a callable
    `refine(bucket) -> low-bits histogram of the elements in that bucket`, called only when
    the first pass did not settle it.

    k = 0 keeps nothing and returns KEEP_NOTHING without calling refine.
    """
    if k == 0:
        return KEEP_NOTHING
    found = locate_kth(hist, k)
    return found.threshold(None if found.settled else refine(found.bucket))


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """int32 view of |tau| (float32, contiguous): non-negative, ordered as the magnitudes."""
    return tau.abs().view(torch.int32)


def thresholds_of_ranks(hists: torch.Tensor, ranks: list[tuple[int, ...]], refine) -> list[tuple[float, ...]]:
    """Per model i, the k-th largest |tau_i| for each k in ranks[i], from packed histograms
    hists[i]; refine(i, bucket) gives the low-bits histogram where pass 1 did not settle one.
    One refine per (model, bucket): two ranks in the same bucket share it."""
    found = []
    for i, model_ranks in enumerate(ranks):
        cache: dict[int, torch.Tensor] = {}

        def low_bits(bucket: int, i=i, cache=cache) -> torch.Tensor:
            if bucket not in cache:
                cache[bucket] = refine(i, bucket)
            return cache[bucket]

        found.append(tuple(threshold_from_histograms(hists[i], k, low_bits) for k in model_ranks))
    return found


# Below this many elements a sort is cheaper than 65536-bin histograms (whose set-up alone
# costs ~1 ms per tensor): checkpoints with 10^4-10^5 small tensors (MoE experts, biases,
# norms) would otherwise spend their time zeroing histograms.
SORT_BELOW = 1 << 14


def sorted_thresholds(base: torch.Tensor, models: list[torch.Tensor],
                      ranks: list[tuple[int, ...]]) -> list[tuple[float, ...]]:
    """The same thresholds as the histograms give (the exact k-th largest float32 |tau_i|, which
    is one of the values), by sorting |f32(theta_i) - f32(theta_0)|: for small tensors."""
    base32 = base.reshape(-1).float()
    found = []
    for model, model_ranks in zip(models, ranks):
        ordered = (model.reshape(-1).float() - base32).abs_().sort(descending=True).values
        found.append(tuple(KEEP_NOTHING if k == 0 else float(ordered[k - 1]) for k in model_ranks))
    return found


def tensor_thresholds(backend, base: torch.Tensor, models: list[torch.Tensor],
                      ranks: list[tuple[int, ...]]) -> list[tuple[float, ...]]:
    """Tensor-scope magnitude thresholds, per model one per rank (ElementPlan.magnitude_ranks):
    one `magnitude_histograms` pass for all models, then a `magnitude_histogram(..., bucket)`
    refine only where pass 1 did not settle; a sort for tensors below SORT_BELOW elements."""
    if base.numel() < SORT_BELOW:
        return sorted_thresholds(base, models, ranks)
    hists = backend.magnitude_histograms(base, models)
    return thresholds_of_ranks(hists, ranks, lambda i, bucket: backend.magnitude_histogram(base, models[i], bucket))
