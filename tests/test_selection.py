"""Exact thresholds from packed magnitude histograms (lines_fast/selection.py), and the CPU
backend's histograms, against hand-worked cases and the reference's sort-based thresholds."""
from __future__ import annotations

import pytest
import torch

from lines_fast import reference as ref
from lines_fast.backends.cpu import CpuBackend
from lines_fast.selection import (
    BINS, KEEP_NOTHING, locate_kth, nonfinite_count, packed_bins, tensor_thresholds, threshold_from_histograms,
    unpack,
)
from lines_fast.spec import kept_count

ONE_PLUS_ULP = 1.0000001192092896  # 0x3F800001: bucket 0x3F80, low bits 1


def _packed(values) -> torch.Tensor:
    bits = torch.tensor(values, dtype=torch.float32).abs().view(torch.int32)
    return torch.bincount(packed_bins(bits), minlength=BINS)


def _low_bits(values, bucket: int) -> torch.Tensor:
    bits = torch.tensor(values, dtype=torch.float32).abs().view(torch.int32)
    return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=BINS)


def test_packed_bins_by_hand():
    bits = torch.tensor([0x3F800000, 0x3F800001, 0, 0x0000FFFF, 0x7F800000], dtype=torch.int32)
    assert packed_bins(bits).tolist() == [0x3F80, 0xBF80, 0, 0x8000, 0x7F80]


def test_unpack_and_nonfinite_count():
    hist = _packed([1.0, ONE_PLUS_ULP, -1.0, float("inf"), 0.5])
    buckets, nonzero_low = unpack(hist)
    assert buckets.shape == (BINS // 2,)
    assert int(buckets[0x3F80]) == 3 and int(nonzero_low[0x3F80]) == 1
    assert int(buckets[0x3F00]) == 1 and int(nonzero_low[0x3F00]) == 0
    assert nonfinite_count(hist) == 1


# |tau| = 1+ulp, 1, 1, 1, 0.5: bucket 0x3F80 holds four (one with nonzero low bits), 0x3F00 one.
VALUES = [1.0, -ONE_PLUS_ULP, 1.0, -1.0, 0.5]


@pytest.mark.parametrize("k, bucket, rank, settled, threshold", [
    (1, 0x3F80, 1, False, ONE_PLUS_ULP),  # the top of the bucket has nonzero low bits: refine
    (2, 0x3F80, 2, True, 1.0),            # past the one nonzero-low element: exactly 0x3F800000
    (4, 0x3F80, 4, True, 1.0),
    (5, 0x3F00, 1, True, 0.5),
])
def test_locate_kth_by_hand(k, bucket, rank, settled, threshold):
    found = locate_kth(_packed(VALUES), k)
    assert (found.bucket, found.rank, found.settled) == (bucket, rank, settled)
    assert found.threshold(_low_bits(VALUES, bucket)) == threshold
    if not settled:
        with pytest.raises(ValueError, match="refine"):
            found.threshold()


def test_refine_is_called_only_when_pass_one_does_not_settle():
    calls = []

    def refine(bucket):
        calls.append(bucket)
        return _low_bits(VALUES, bucket)

    assert threshold_from_histograms(_packed(VALUES), 2, refine) == 1.0 and calls == []
    assert threshold_from_histograms(_packed(VALUES), 1, refine) == ONE_PLUS_ULP and calls == [0x3F80]
    assert threshold_from_histograms(_packed(VALUES), 0, refine) == KEEP_NOTHING and calls == [0x3F80]


def _cpu_histogram_reference(base, model, bucket=None):
    bits = (model.float() - base.float()).abs().reshape(-1).view(torch.int32)
    if bucket is None:
        nonzero_low = ((bits & 0xFFFF) != 0).to(torch.int32)
        return torch.bincount((bits >> 16) + 32768 * nonzero_low, minlength=BINS)
    return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=BINS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_cpu_histograms(dtype, chunk):
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(3000, generator=g) * 0.02).to(dtype)
    model = (base.float() + torch.randn(3000, generator=g) * 2e-3).to(dtype)
    model[::5] = base[::5]  # exact zeros
    other = (base.float() - torch.randn(3000, generator=g) * 1e-3).to(dtype)
    backend = CpuBackend(chunk=chunk)
    hist = backend.magnitude_histogram(base, model)
    assert torch.equal(hist, _cpu_histogram_reference(base, model))
    both = backend.magnitude_histograms(base, [model, other])  # one read of the base for all models
    assert both.shape == (2, BINS) and torch.equal(both[0], hist)
    assert torch.equal(both[1], _cpu_histogram_reference(base, other))
    bucket = int(unpack(hist)[0][1:].argmax()) + 1
    assert torch.equal(backend.magnitude_histogram(base, model, bucket), _cpu_histogram_reference(base, model, bucket))


def test_thresholds_equal_the_reference_settled_or_not():
    """Over many tensors: every threshold equals the sort-based one, and both paths (settled
    by pass 1, refined) are taken, so neither goes untested."""
    g = torch.Generator().manual_seed(5)
    backend = CpuBackend()
    paths = set()
    for trial in range(40):
        dtype = (torch.bfloat16, torch.float32)[trial % 2]
        base = (torch.randn(700, generator=g) * 0.02).to(dtype)
        scale = float(torch.rand(1, generator=g)) * 0.05
        model = (base.float() + torch.randn(700, generator=g) * scale).to(dtype)
        density = float(torch.rand(1, generator=g))
        k = kept_count(density, base.numel())
        if k:
            paths.add(locate_kth(backend.magnitude_histogram(base, model), k).settled)
        ((got,),) = tensor_thresholds(backend, base, [model], [(k,)])
        want = ref.trim_thresholds({"w": model.float() - base.float()}, density, "tensor")["w"]
        assert got == want, (trial, dtype, density)
    assert paths == {True, False}


def test_small_tensors_sort_and_large_ones_count_to_the_same_thresholds():
    """tensor_thresholds sorts below SORT_BELOW elements and counts histograms above: on the same
    magnitudes (bf16 deltas: many ties, ~30% exact zeros) both give every rank's exact value."""
    from lines_fast.selection import KEEP_NOTHING, SORT_BELOW, sorted_thresholds, thresholds_of_ranks

    g = torch.Generator().manual_seed(11)
    backend = CpuBackend()
    n = SORT_BELOW + 123
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    delta = torch.randn(n, generator=g) * 0.01 * (torch.rand(n, generator=g) > 0.3)
    models = [(base.float() + delta * s).to(torch.bfloat16) for s in (1.0, 0.3)]
    ranks = [(0, 1, 7, n // 5, n // 2, n), (3, n - 1)]
    counted = thresholds_of_ranks(backend.magnitude_histograms(base, models), ranks,
                                  lambda i, bucket: backend.magnitude_histogram(base, models[i], bucket))
    assert sorted_thresholds(base, models, ranks) == counted == tensor_thresholds(backend, base, models, ranks)
    mags = (models[0].float() - base.float()).abs()
    assert counted[0][0] == KEEP_NOTHING and counted[0][1] == float(mags.max())
    assert counted[0][3] == float(mags.kthvalue(n - n // 5 + 1).values)   # the (n/5)-th largest
    small = [m[:1000] for m in models]
    assert sorted_thresholds(base[:1000], small, [(1, 10, 500)] * 2) == thresholds_of_ranks(
        backend.magnitude_histograms(base[:1000], small), [(1, 10, 500)] * 2,
        lambda i, bucket: backend.magnitude_histogram(base[:1000], small[i], bucket))
