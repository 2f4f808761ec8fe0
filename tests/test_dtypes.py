"""lines_fast/dtypes.py: the dtype table the front end uses without torch, and the NaN/Inf check of
stored bits that a copy makes without it."""
import pytest
import torch

from lines_fast import dtypes
from lines_fast.dtypes import BY_CODE, all_finite

SAMPLES = [0.0, -0.0, 1.0, -3.5, 2.0 ** -20, 1e-40]   # 1e-40: subnormal in float32, 0 or tiny in the others


def test_every_dtype_maps_to_torch_and_back():
    for code, d in BY_CODE.items():
        t = getattr(torch, d.name, None)
        if t is None:
            continue   # a float8 / unsigned type this torch lacks
        assert d.torch is t and dtypes.of(t) is d and dtypes.of(d) is d
        assert d.itemsize == torch.empty(0, dtype=t).element_size()
        assert d.is_floating_point == t.is_floating_point
    assert dtypes.of("torch.bfloat16") is dtypes.BFLOAT16 and str(dtypes.BFLOAT16) == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_all_finite_reads_the_exponent_bits(dtype, bad, monkeypatch):
    monkeypatch.setattr(dtypes, "_FINITE_STEP", 4)   # several steps, the last one short
    d = dtypes.of(dtype)
    finite = torch.tensor(SAMPLES + [torch.finfo(dtype).max, -torch.finfo(dtype).max] + SAMPLES[:3], dtype=dtype)
    assert all_finite(memoryview(finite.view(torch.uint8).numpy()), d)
    for at in (0, 5, finite.numel() - 1):   # the first step, a middle one, the short last one
        x = finite.clone()
        x[at] = bad
        assert not all_finite(memoryview(x.view(torch.uint8).numpy()), d), at
    assert all_finite(memoryview(b""), d)
