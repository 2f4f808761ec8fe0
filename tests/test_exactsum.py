import math
from fractions import Fraction

import pytest
import torch

from lines_fast.exactsum import AbsSum


def test_sum_is_exact_and_order_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.logspace(-30, 10, 100_000)
    x[:10] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, 1.17549435e-38, 1.0, -1.0, 2.0 ** -126, 5e-40])
    exact = sum(Fraction(v) for v in x.abs().double().tolist())
    forward, chunked = AbsSum(), AbsSum()
    forward.add(x)
    for piece in torch.randperm(x.numel(), generator=g).split(777):
        chunked.add(x[piece])
    assert forward.value() == chunked.value() == float(exact)
    assert forward.value() != 0 and math.isfinite(forward.value())


def test_empty_and_zero():
    s = AbsSum()
    assert s.value() == 0.0
    s.add(torch.zeros(5))
    assert s.value() == 0.0


def test_compiled_sums_are_the_torch_sums(monkeypatch):
    """lines_fast/jit.py's add_abs_bins: the same integer bins (so the same value) as the torch code."""
    import pytest

    from lines_fast import jit

    if jit.kernels() is None:
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=g) * torch.logspace(-44, 38, 50_000)
    x[:6] = torch.tensor([0.0, -0.0, 1e-45, -3e38, 1.17549435e-38, 5e-40])
    monkeypatch.setattr(jit, "JIT_AFTER", 1 << 62)
    torch_sum = AbsSum()
    torch_sum.add(x)
    monkeypatch.setattr(jit, "JIT_AFTER", 0)
    compiled = AbsSum()
    compiled.add(x[::2])       # a strided view: made contiguous first
    compiled.add(x[1::2])
    assert torch.equal(compiled.bins, torch_sum.bins)
    exact = sum(Fraction(v) for v in x.abs().double().tolist())
    assert compiled.value() == float(exact)


def test_row_sums_are_the_exact_sums_of_each_row():
    """exactsum.row_abs_sums: per row, the value AbsSum gives (zeros, subnormals, huge and
    cancelling magnitudes, a row of zeros)."""
    from lines_fast.exactsum import row_abs_sums

    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 300, generator=g) * torch.logspace(-30, 30, 300)
    x[1] = 0.0
    x[2, :10] = 1.4e-45                       # the smallest subnormal
    x[3, ::2], x[3, 1::2] = 3.0e38, -3.0e38   # |x| sums past float32's range
    x[4] = torch.tensor(1.0) + torch.arange(300) * 2.0 ** -23
    for row, got in zip(x, row_abs_sums(x)):
        one = AbsSum()
        one.add(row)
        assert got == one.value()
    assert row_abs_sums(torch.zeros(3, 4)) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_a_nonfinite_value_makes_the_sum_inf_not_huge(bad):
    """A NaN's exponent bits are all ones: counted as a significand it made a huge finite sum,
    whose float32 rescale factor overflowed with a RuntimeWarning before the merge named the NaN."""
    total = AbsSum()
    total.add(torch.tensor([1.0, bad, 2.0]))
    assert total.value() == math.inf
    import warnings
    from lines_fast.plan import rescale_factor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rescale_factor(total.value(), 1.0) == math.inf
