"""Hot CPU loops compiled by numba, bit for bit the torch code they stand in for.

- fill_uniform, fill_uniform_rows: DARE / DELLA's draws (rng.py), of a tensor or of a pack of
  equal-sized tensors (one row each). Philox4x32-10 in torch is ~80 whole-array int64
  operations per draw (~50 M draws/s on 2 cores), which made DARE and DELLA merges several times
  slower than TIES on the CPU; compiled, one element's ten rounds stay in registers (~300 M/s on
  one core). The arithmetic is rng.py's (uint64 products of 32-bit words, their high and low
  halves), then Triton's uint_to_uniform_float, every constant a uint64 or float32 so numba
  never widens to float64.
- della_drop_p: DELLA's per-row ranks and drop probabilities (plan.ranked_drop_p): a sort per
  row, the first-equal position of each magnitude, and the same float64 formula, one loop per
  row and rows over all cores, instead of ten whole-array operations.
- add_abs_bins: exactsum.AbsSum's per-exponent integer sums of significands (L1 norms: DARE's
  rescale, LiNeS alpha auto), one pass instead of five whole-array operations and a bincount.

Loading numba, LLVM and the cached machine code costs ~0.7 s, so a process uses them only once
it has done JIT_AFTER elements of such work in torch (`compiled(work)`; a small draw counts as
CALL_WORK): small merges never pay it, large ones (10^9-10^11 elements, or 10^4 tiny tensors)
run several times faster. numba is optional: without it, or with LINES_FAST_NO_NUMBA=1, the
torch code runs, and the tests check that the two agree.
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

JIT_AFTER = 1 << 24
# What one small call costs in torch, in elements of work: a Philox draw is ~80 whole-array
# operations whatever its size, so 10^4 draws for tiny tensors count as the large draw they cost.
CALL_WORK = 1 << 14
_work_in_torch = 0
_kernels: SimpleNamespace | None = None
_tried = False


def compiled(work: int) -> SimpleNamespace | None:
    """The compiled kernels once JIT_AFTER elements of work went to torch; else None, and the
    caller does these `work` elements in torch (they count)."""
    global _work_in_torch
    if _work_in_torch < JIT_AFTER:
        _work_in_torch += work
        return None
    return kernels()


def kernels() -> SimpleNamespace | None:
    """The compiled kernels, or None where numba is unavailable (or LINES_FAST_NO_NUMBA=1)."""
    global _kernels, _tried
    if not _tried:
        _tried = True
        if os.environ.get("LINES_FAST_NO_NUMBA") != "1":
            try:
                _kernels = _compile()
            except ImportError:
                _kernels = None
    return _kernels


def _compile() -> SimpleNamespace:
    import numba
    import numpy as np

    u64, i64, f32 = np.uint64, np.int64, np.float32
    mask, s31, s32 = u64(0xFFFFFFFF), u64(31), u64(32)
    round_a, round_b = u64(0xD2511F53), u64(0xCD9E8D57)
    key_a, key_b = u64(0x9E3779B9), u64(0xBB67AE85)
    scale = f32(4.6566127342e-10)
    abs_mask, significand, hidden, shift = i64(0x7FFFFFFF), i64(0x7FFFFF), i64(1), i64(23)

    def uniform_at(j, c2, c3, k0, k1):
        """u of flat index j (uint64) in stream (c2, c3) under key (k0, k1): rng.py's derivation."""
        x0, x1, x2, x3 = j & mask, j >> s32, c2, c3
        a, b = k0, k1
        for _ in range(10):
            pb = round_b * x2
            pa = round_a * x0
            x0 = (pb >> s32) ^ x1 ^ a
            x2 = (pa >> s32) ^ x3 ^ b
            x1 = pb & mask
            x3 = pa & mask
            a = (a + key_a) & mask
            b = (b + key_b) & mask
        if x0 >> s31:
            x0 = x0 ^ mask          # int32 reading: negatives become ~x
        return f32(i64(x0)) * scale

    uniform_at = numba.njit(inline="always")(uniform_at)

    def fill_uniform(start, out, c2, c3, k0, k1):
        """out[t] = u of flat index start + t of the tensor whose stream id is c2."""
        for t in range(out.shape[0]):
            out[t] = uniform_at(u64(start) + u64(t), u64(c2), u64(c3), u64(k0), u64(k1))

    def fill_uniform_rows(out, c2s, c3, k0, k1):
        """out[r, t] = u of flat index t of the tensor whose stream id is c2s[r] (a pack of
        equal-sized tensors, one per row)."""
        for r in range(out.shape[0]):
            c2 = u64(c2s[r])
            for t in range(out.shape[1]):
                out[r, t] = uniform_at(u64(t), c2, u64(c3), u64(k0), u64(k1))

    def add_abs_bins(bits, bins):
        """bins[E] += significand of |x| for the float32 bit patterns `bits` (exactsum.py)."""
        for v in bits:
            b = i64(v) & abs_mask
            e = b >> shift
            bins[e] += (b & significand) | (min(e, hidden) << shift)

    f64 = np.float64

    def della_drop_p(magnitudes, density, eps, out):
        """out[r, j] = 1 - ((density - eps) + rank / top * (2 eps)) rounded to float32, rank: how many
        magnitudes of row r are strictly smaller than [r, j], top: the row's largest rank (0: 0.5)."""
        rows, length = magnitudes.shape
        low, spread = f64(density) - f64(eps), f64(2.0) * f64(eps)
        for r in numba.prange(rows):
            row = magnitudes[r]
            order = np.argsort(row)
            rank = np.empty(length, dtype=np.float64)
            first = 0
            for p in range(length):
                if p > 0 and row[order[p]] != row[order[p - 1]]:
                    first = p
                rank[order[p]] = first
            top = f64(first)
            for j in range(length):
                normalized = rank[j] / top if top > 0 else f64(0.5)
                out[r, j] = f32(f64(1.0) - (low + normalized * spread))

    with warnings.catch_warnings():
        # An unwritable package directory only costs the on-disk cache of the compiled code.
        warnings.simplefilter("ignore")
        jit = numba.njit(cache=True, nogil=True)
        return SimpleNamespace(fill_uniform=jit(fill_uniform), fill_uniform_rows=jit(fill_uniform_rows),
                               add_abs_bins=jit(add_abs_bins),
                               della_drop_p=numba.njit(cache=True, nogil=True, parallel=True)(della_drop_p))
