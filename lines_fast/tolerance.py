"""docs/methods.md's tolerances, fast path vs reference, in one place (tests and the demo use it).

- float32 output: |fast - ref| <= 4 ulp of the reference value, or <= 1e-7 * max|ref| in the
  tensor for values near 0.
- bf16 / fp16 output: equal except where the float32 results straddle a rounding boundary:
  at most 1 ulp of the output dtype, on at most 1e-4 of the elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Comparison:
    ok: bool
    max_abs_diff: float
    n_different: int
    numel: int
    why: str = ""


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (distance to the next representable value away from 0)."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def compare(fast: torch.Tensor, ref: torch.Tensor) -> Comparison:
    if fast.shape != ref.shape or fast.dtype != ref.dtype:
        return Comparison(False, float("inf"), fast.numel(), fast.numel(),
                          f"shape/dtype {tuple(fast.shape)} {fast.dtype} vs {tuple(ref.shape)} {ref.dtype}")
    if not ref.is_floating_point():
        equal = torch.equal(fast, ref)
        return Comparison(equal, 0.0 if equal else float("inf"), 0 if equal else int((fast != ref).sum()),
                          ref.numel(), "" if equal else "non-float tensors differ")
    numel = ref.numel()
    same = (fast == ref) | (torch.isnan(fast) & torch.isnan(ref))
    n_diff = int((~same).sum())
    diff = (fast.double() - ref.double()).abs()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    max_diff = float(diff.max()) if numel else 0.0
    if n_diff == 0:
        return Comparison(True, 0.0, 0, numel)
    if ref.dtype == torch.float32 or ref.dtype == torch.float64:
        scale = float(ref.abs().max())
        allowed = torch.maximum(4 * _ulp(ref).double(), torch.full_like(diff, 1e-7 * scale))
        bad = int((diff > allowed).sum())
        return Comparison(bad == 0, max_diff, n_diff, numel,
                          "" if bad == 0 else f"{bad} element(s) beyond 4 ulp / 1e-7*max|ref|")
    # Half-precision outputs: each difference at most 1 ulp of the output dtype, and rare.
    one_ulp = torch.minimum(_ulp(ref), _ulp(fast)).double()
    beyond = int((diff > one_ulp).sum())
    too_many = n_diff > 1e-4 * numel
    why = []
    if beyond:
        why.append(f"{beyond} element(s) differ by more than 1 ulp")
    if too_many:
        why.append(f"{n_diff} of {numel} elements differ (more than 1e-4)")
    return Comparison(not why, max_diff, n_diff, numel, "; ".join(why))
