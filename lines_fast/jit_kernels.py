"""The compiled CPU kernels (numba), loaded only through lines_fast/jit.py's kernels().

Module-level functions, so numba's on-disk cache (cache=True) finds them again in the next
process: a kernel defined inside a function closes over the helpers it calls, and numba keys
its cache on those cells, which differ in every process (each kernel compiled anew, 1-8 s).
What each kernel computes, and the torch code it must equal bit for bit: lines_fast/jit.py.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import (BLOCK, STEP_BAND, STEP_BASE, STEP_DELTAS, STEP_DIVIDE, STEP_DROP, STEP_ELECT, STEP_KEPT,
                  STEP_COPY, STEP_GROUP_COLUMNS, STEP_GROUP_ROWS, STEP_MULTIPLY, STEP_NORMALIZE, STEP_TALL,
                  STEP_TASK_SUM, STEP_TAU, STEP_TRIM)
from .selection import BINS, NONZERO_LOW

# numba freezes the globals a kernel reads into its cached machine code, and its cache checks only
# this file's stamp: were a constant changed in jit.py or selection.py alone, the cached kernels
# would keep the old value. So their values are written here too, and a change must edit this file.
assert (BLOCK, STEP_BASE, STEP_DELTAS, STEP_TRIM, STEP_BAND, STEP_DROP, STEP_DIVIDE, STEP_MULTIPLY, STEP_ELECT,
        STEP_NORMALIZE, STEP_KEPT, STEP_TAU, STEP_TASK_SUM, STEP_TALL, STEP_COPY, STEP_GROUP_ROWS, STEP_GROUP_COLUMNS,
        BINS, NONZERO_LOW) == (
        1024, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 1 << 16, 1 << 15), \
    "a constant the compiled kernels read changed: update this line (it invalidates numba's cache)"

_serial = numba.njit(cache=True, nogil=True)
_parallel = numba.njit(cache=True, nogil=True, parallel=True)

u64, i64, f32 = np.uint64, np.int64, np.float32
mask, s31, s32 = u64(0xFFFFFFFF), u64(31), u64(32)
round_a, round_b = u64(0xD2511F53), u64(0xCD9E8D57)
key_a, key_b = u64(0x9E3779B9), u64(0xBB67AE85)
uniform_scale = f32(4.6566127342e-10)   # 2^-31: Triton's uint_to_uniform_float
abs_mask, significand, hidden, shift = i64(0x7FFFFFFF), i64(0x7FFFFF), i64(1), i64(23)


@numba.njit(inline="always", cache=True)
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
    return f32(i64(x0)) * uniform_scale


@_serial
def fill_uniform(start, out, c2, c3, k0, k1):
    """out[t] = u of flat index start + t of the tensor whose stream id is c2."""
    for t in range(out.shape[0]):
        out[t] = uniform_at(u64(start) + u64(t), u64(c2), u64(c3), u64(k0), u64(k1))


@_parallel
def fill_uniform_shared(start, out, c2, c3, k0, k1, threads):
    """fill_uniform with the elements shared among `threads` threads (each draw is independent
    of the others: the same u whatever the split); for large draws only, as a parallel call
    costs more than a small draw."""
    n = out.shape[0]
    per = -(-n // threads)
    for t in numba.prange(threads):
        for j in range(t * per, min(n, (t + 1) * per)):
            out[j] = uniform_at(u64(start) + u64(j), u64(c2), u64(c3), u64(k0), u64(k1))


@_serial
def fill_uniform_rows(out, c2s, c3, k0, k1):
    """out[r, t] = u of flat index t of the tensor whose stream id is c2s[r] (a pack of
    equal-sized tensors, one per row)."""
    for r in range(out.shape[0]):
        c2 = u64(c2s[r])
        for t in range(out.shape[1]):
            out[r, t] = uniform_at(u64(t), c2, u64(c3), u64(k0), u64(k1))


@_serial
def add_abs_bins(bits, bins):
    """bins[E] += significand of |x| for the float32 bit patterns `bits` (exactsum.py)."""
    for v in bits:
        b = i64(v) & abs_mask
        e = b >> shift
        bins[e] += (b & significand) | (min(e, hidden) << shift)

@_parallel
def add_abs_bins_kept(bits, keep, total_bins, kept_bins, packed, threads):
    """add_abs_bins of `bits` into total_bins and of its kept elements (keep: bool as uint8) into
    kept_bins, and keep packed 8 to a byte into `packed` (element j in bit j % 8 of byte j // 8,
    backends/cpu.py's _pack_bits): the L1 rescale statistics of DARE and DELLA in one pass
    (torch.where, a second sum and the packing before). Each thread counts whole bytes' elements
    into bins of its own, 4 sets by j % 4 (consecutive elements of like magnitude hit one bin: one
    set made every add wait for the last), added up at the end: integer sums, so the same bits
    in any order. A kept element adds m * 1, a dropped one m * 0: no branch to mispredict at
    50% density."""
    n, width = bits.shape[0], total_bins.shape[0]
    nbytes = (n + 7) >> 3
    per = -(-nbytes // threads)
    local = np.zeros((threads, 2, 4, width), np.int64)
    for t in numba.prange(threads):
        for q in range(t * per, min(nbytes, (t + 1) * per)):
            byte = 0
            for k in range(min(8, n - 8 * q)):
                j = 8 * q + k
                b = i64(bits[j]) & abs_mask
                e = b >> shift
                m = (b & significand) | (min(e, hidden) << shift)
                kept = i64(keep[j] != 0)
                local[t, 0, k & 3, e] += m
                local[t, 1, k & 3, e] += m * kept
                byte |= kept << k
            packed[q] = np.uint8(byte)
    for t in range(threads):
        for lane in range(4):
            for e in range(width):
                total_bins[e] += local[t, 0, lane, e]
                kept_bins[e] += local[t, 1, lane, e]


f64 = np.float64


RADIX = 11                           # della_drop_p sorts 32-bit keys in 3 passes of 11 bits
RADIX_MASK = np.uint32((1 << RADIX) - 1)
magnitude_bits = np.uint32(0x7FFFFFFF)   # a float32's bits less its sign: |x|


@_parallel
def della_drop_p(x, density, eps, out, keep, draw, start, c2, c3, k0, k1):
    """out[r, j] = 1 - ((density - eps) + rank / top * (2 eps)) rounded to float32, rank: how many
    magnitudes |x| of row r are strictly smaller than |x[r, j]|, top: the row's largest rank (0:
    0.5). draw: instead, keep[r, j] = 1 where DELLA keeps the element, 0 where it drops it (a bool
    array's bytes; out is not written), keep = u >= p with u = fill_uniform's draw of flat index
    start + r * length + j in stream (c2, c3) under key (k0, k1): plan.keep_masks' rule, without
    the p and u arrays. Returns False, unfinished, if any x is Inf or NaN (the caller's torch path
    then takes it). Finite magnitudes' bit patterns (the sign bit cleared: |x|, -0.0 as +0.0) order as
    they do: each row is sorted by an LSD radix sort of the bits (3 passes of 11 bits, all three
    histograms in one read, a pass skipped where every key has the same digit; 3-6x numba's
    argsort), and equal magnitudes share the first position of their run: the same ranks as a
    comparison sort. Rows over the cores."""
    rows, length = x.shape
    low, spread = f64(density) - f64(eps), f64(2.0) * f64(eps)
    nonfinite = np.zeros(rows, np.uint8)
    for r in numba.prange(rows):
        row = x[r]
        keys, spare_keys = np.empty(length, np.uint32), np.empty(length, np.uint32)
        index, spare_index = np.empty(length, np.int32), np.empty(length, np.int32)
        counts = np.zeros((3, 1 << RADIX), np.int32)
        for j in range(length):
            k = as_bits(row[j]) & magnitude_bits
            if k >= f32_exponent:
                nonfinite[r] = 1
            keys[j] = k
            index[j] = j
            counts[0, k & RADIX_MASK] += 1
            counts[1, (k >> np.uint32(RADIX)) & RADIX_MASK] += 1
            counts[2, k >> np.uint32(2 * RADIX)] += 1
        for d in range(3):
            shift = np.uint32(RADIX * d)
            starts = counts[d]
            if length == 0 or starts[(keys[0] >> shift) & RADIX_MASK] == length:
                continue   # every key has this digit: the pass would move nothing
            total = 0
            for v in range(1 << RADIX):   # counts -> each digit's first position
                c = starts[v]
                starts[v] = total
                total += c
            for j in range(length):   # stable: equal digits keep the previous passes' order
                k = keys[j]
                v = (k >> shift) & RADIX_MASK
                p = starts[v]
                starts[v] = p + 1
                spare_keys[p] = k
                spare_index[p] = index[j]
            keys, spare_keys = spare_keys, keys
            index, spare_index = spare_index, index
        rank = spare_keys   # reused: the rank of each original position
        first = 0
        for p in range(length):
            if p > 0 and keys[p] != keys[p - 1]:
                first = p
            rank[index[p]] = np.uint32(first)
        top = f64(first)
        if draw:
            at = u64(start) + u64(r) * u64(length)
            for j in range(length):
                normalized = f64(rank[j]) / top if top > 0 else f64(0.5)
                p = f32(f64(1.0) - (low + normalized * spread))
                u = uniform_at(at + u64(j), u64(c2), u64(c3), u64(k0), u64(k1))
                keep[r, j] = 1 if u >= p else 0
        else:
            for j in range(length):
                normalized = f64(rank[j]) / top if top > 0 else f64(0.5)
                out[r, j] = f32(f64(1.0) - (low + normalized * spread))
    return not nonfinite.any()


@intrinsic
def as_float(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits`."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def as_bits(typingctx, value):
    """The bit pattern (uint32) of the float32 `value`."""
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


def widen(a, j):
    """float32 of element j of a bf16 (its bits as uint16), fp16 (its bits as int16) or float32
    array: exact. numba has neither 16-bit float type on the CPU, so the two arrive as integers,
    told apart by signedness (cpu_fused.as_array)."""


half_magnitude, half_exponent, half_sign = np.uint32(0x7FFF), np.uint32(0x7C00), np.uint32(0x8000)
two_112 = np.uint32(0x77800000)   # the float32 2^112: rebases fp16's exponent bias (15) to float32's (127)
f32_exponent, significand_bits, quiet_bit = np.uint32(0x7F800000), np.uint32(0x7FFFFF), np.uint32(0x400000)


@numba.njit(cache=True)
def half_to_float(h):
    """The float32 of fp16 bits h (uint32 < 2^16): magnitude bits moved to float32's positions are
    2^-112 times the value (exact, subnormals included: the product is a normal float32 then);
    Inf and NaN keep their significand under an all-ones exponent (NaN quieted, as the CPU's own
    conversion and torch's do); the sign bit last. Bit for bit torch's .float() of every one of
    the 65536 patterns (tests/test_cpu_fused.py). No variable is assigned twice: numba's
    inliner warns about that (LLVM inlines this function anyway)."""
    magnitude = (h & half_magnitude) << np.uint32(13)
    finite = as_bits(as_float(magnitude) * as_float(two_112))
    special = magnitude | f32_exponent | (quiet_bit if magnitude & significand_bits else no_bits)
    return as_float((special if h & half_exponent == half_exponent else finite) | ((h & half_sign) << np.uint32(16)))


@overload(widen, inline="always")
def _widen(a, j):
    if a.dtype == types.uint16:     # bf16 is the high half of a float32
        return lambda a, j: as_float(np.uint32(a[j]) << np.uint32(16))
    if a.dtype == types.int16:      # fp16
        return lambda a, j: half_to_float(np.uint32(np.uint16(a[j])))
    if a.dtype == types.float32:
        return lambda a, j: a[j]


zero, one, no_bits, minus_zero = f32(0.0), f32(1.0), np.uint32(0), f32(-0.0)


@_parallel
def merge_chunk(base, models, draws, masks, table, steps, zero_sign, weight_sum, scale, out, task_sum, tall_k,
                group_weights, group_len, start, threads):
    """out = the merged float32 values of one chunk: backends/cpu.py's _merged_delta, then
    * scale + base, for plans with given weights and no consensus mask. table: plan.table's
    float32 [7, N] (weights, thresholds, drop_p, divisors, factors, ceilings, tall_lambdas). steps: the
    STEP_* bits. draws: DARE's u per model ([N, n] float32; any shape when not dropping);
    masks: instead, its keep masks as the rescale statistics drew them (per model, uint8 with
    element j in bit j % 8 of byte j // 8; any arrays without STEP_KEPT). STEP_TAU: out = tau_m
    (lambda = 1, no base added); STEP_TASK_SUM: task_sum = sum_i tau_i, before sparsifying, in
    model order (LiNeS alpha auto's norms; any array without it). STEP_TALL: the merged value is
    +0 where fewer than tall_k models matter, model i mattering where |x_i| >= table[6, i] *
    |S - x_i|, S = sum_j x_j of the raw task vectors in model order (backends/cpu.py's _tall_keep).
    STEP_GROUP_ROWS / STEP_GROUP_COLUMNS: model i's weight is group_weights[i, g] (float32 [N, G]),
    g = (start + j) // group_len or (start + j) % group_len for element j of the chunk (start: the
    chunk's flat index in its tensor); else table[0, i].
    Returns False if any input value read is Inf or NaN (the caller then runs the torch
    path, which names the model).

    Each step is its own loop over a block of BLOCK elements (in L1), with the step's switch
    outside it, indexing block slices from 0: LLVM vectorizes such a loop, not one that tests
    switches per element, nor one indexing a[s + j] (numba wraps negative indices, and cannot
    prove s + j >= 0); 10x faster."""
    n, count = out.shape[0], len(models)
    per = -(-n // (threads * BLOCK)) * BLOCK   # each thread's share, whole blocks: every s is a multiple of BLOCK
    nonfinite = np.zeros(threads, np.uint32)   # per thread: prange reduces only sums and products
    for t in numba.prange(threads):
        b = np.zeros(BLOCK, np.float32)
        acc, num, den = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
        bad = np.empty(BLOCK, np.uint32)
        c = np.empty((count, BLOCK), np.float32)
        votes = np.empty(BLOCK, np.int32)
        group = np.empty(BLOCK, np.int64)
        end = min(n, (t + 1) * per)
        for s in range(t * per, end, BLOCK):
            size = min(BLOCK, end - s)
            bad[:size] = no_bits
            acc[:size] = minus_zero if steps & STEP_COPY else zero   # COPY: -0.0 + c_0 is c_0, sign of 0 too
            if steps & STEP_TASK_SUM:
                task_sum[s:s + size] = zero
            if steps & STEP_GROUP_ROWS:   # each element's group, counted on (no division per element)
                g = (start + s) // group_len
                r = start + s - g * group_len
                for j in range(size):
                    group[j] = g
                    r += 1
                    if r == group_len:
                        r = 0
                        g += 1
            elif steps & STEP_GROUP_COLUMNS:
                g = (start + s) % group_len
                for j in range(size):
                    group[j] = g
                    g += 1
                    if g == group_len:
                        g = 0
            if steps & STEP_BASE:
                block = base[s:s + size]
                for j in range(size):
                    b[j] = widen(block, j)
                    bad[j] |= as_bits(b[j] - b[j])   # x - x is +0, or NaN where x is Inf or NaN
            for i in range(count):
                block, x = models[i][s:s + size], c[i]
                for j in range(size):
                    x[j] = widen(block, j)
                if steps & STEP_DELTAS:
                    for j in range(size):
                        x[j] = x[j] - b[j]
                for j in range(size):
                    bad[j] |= as_bits(x[j] - x[j])
                if steps & STEP_TASK_SUM:
                    block = task_sum[s:s + size]
                    if steps & STEP_DELTAS:
                        for j in range(size):
                            block[j] += x[j]
                    else:
                        for j in range(size):
                            block[j] += x[j] - b[j]
            if steps & STEP_TALL:   # on the raw task vectors, before any is sparsified
                num[:size] = zero   # S = sum_j x_j, from +0 in model order
                votes[:size] = 0
                for i in range(count):
                    x = c[i]
                    for j in range(size):
                        num[j] += x[j]
                for i in range(count):
                    x, lam = c[i], table[6, i]
                    for j in range(size):
                        votes[j] += 1 if abs(x[j]) >= abs(num[j] - x[j]) * lam else 0
            for i in range(count):
                x = c[i]
                if steps & STEP_TRIM:   # keep |x| >= t (ties kept), on the bit patterns
                    low = as_bits(table[1, i])
                    for j in range(size):
                        x[j] = x[j] if as_bits(abs(x[j])) >= low else zero
                if steps & STEP_BAND:   # drop |x| >= c
                    high = as_bits(table[5, i])
                    for j in range(size):
                        x[j] = x[j] if as_bits(abs(x[j])) < high else zero
                if steps & STEP_DROP:   # drop where u < p
                    p, u = as_bits(table[2, i]), draws[i, s:s + size]
                    for j in range(size):
                        x[j] = x[j] if as_bits(u[j]) >= p else zero
                if steps & STEP_KEPT:   # s is a multiple of BLOCK, so of 8
                    kept = masks[i][s >> 3:(s + size + 7) >> 3]
                    for j in range(size):
                        x[j] = x[j] if (kept[j >> 3] >> (j & 7)) & 1 else zero
                if steps & STEP_DIVIDE:
                    q = table[3, i]
                    for j in range(size):
                        x[j] = x[j] / q
                if steps & STEP_MULTIPLY:
                    f = table[4, i]
                    for j in range(size):
                        x[j] = x[j] * f
                if steps & (STEP_GROUP_ROWS | STEP_GROUP_COLUMNS):
                    weights = group_weights[i]
                    for j in range(size):
                        x[j] = x[j] * weights[group[j]]
                        acc[j] += x[j]
                else:
                    w = table[0, i]
                    for j in range(size):
                        x[j] = x[j] * w
                        acc[j] += x[j]               # sum_i c_i in model order, from +0 (COPY: -0)
            if steps & STEP_ELECT:
                # gamma = sign of the sum, zero_sign where it is 0; A = {i : c_i * gamma > 0}.
                for j in range(size):
                    a = acc[j]
                    acc[j] = one if a > zero else (-one if a < zero else zero_sign)
                    num[j] = zero
                    den[j] = zero
                for i in range(count):
                    x, w = c[i], table[0, i]
                    for j in range(size):
                        agrees = x[j] * acc[j] > zero
                        num[j] += x[j] if agrees else zero
                        den[j] += w if agrees else zero
                if steps & STEP_NORMALIZE:   # 0 where A is empty (num is 0 there too)
                    for j in range(size):
                        acc[j] = num[j] / (den[j] + (one if den[j] == zero else zero))
                else:
                    acc[:size] = num[:size]
            elif steps & STEP_NORMALIZE:
                for j in range(size):
                    acc[j] = acc[j] / weight_sum
            if steps & STEP_TALL:
                for j in range(size):
                    acc[j] = acc[j] if votes[j] >= tall_k else zero
            if steps & STEP_BASE:
                if not steps & STEP_DELTAS:   # a soup with LiNeS: tau_m = soup - theta_0
                    for j in range(size):
                        acc[j] = acc[j] - b[j]
                block = out[s:s + size]
                if steps & STEP_TAU:
                    block[:] = acc[:size]
                else:
                    for j in range(size):
                        block[j] = acc[j] * scale + b[j]
            else:
                out[s:s + size] = acc[:size]
            flags = no_bits
            for j in range(size):
                flags |= bad[j]
            nonfinite[t] |= flags
    return not nonfinite.any()


LANES = 16   # gram_chunk's independent float64 sums per block (2-4 vector registers), a fixed order on any CPU


@_parallel
def gram_chunk(base, models, deltas, start, row_len, gram, threads):
    """gram[g, a, b] += sum_j x_a[j] x_b[j] over the chunk's elements j of group g = (start + j) //
    row_len (one group: row_len >= the tensor's size), x_i = f32(models[i]) [- f32(base) in float32
    where deltas], each product exact in float64: gram.py's add_gram. The chunk is cut into blocks
    of at most BLOCK elements within one group; a block's sum is LANES running float64 sums over
    its elements j = l mod LANES, then added in lane order, and the blocks are added into gram in
    order: the bits depend on the chunking only, never on the thread count or the CPU's vector
    width (torch's einsum sums in another order: they agree to float64 rounding)."""
    n, count = models[0].shape[0], len(models)
    pairs = count * (count + 1) // 2
    blocks = 0
    at = 0
    while at < n:
        stop = min(n, ((start + at) // row_len + 1) * row_len - start)
        blocks += (stop - at + BLOCK - 1) // BLOCK
        at = stop
    begins = np.empty(blocks + 1, np.int64)   # block k is begins[k]..begins[k + 1]
    groups = np.empty(blocks, np.int64)
    k = 0
    at = 0
    while at < n:
        g = (start + at) // row_len
        stop = min(n, (g + 1) * row_len - start)
        for s in range(at, stop, BLOCK):
            begins[k] = s
            groups[k] = g
            k += 1
        at = stop
    begins[blocks] = n
    partial = np.zeros((blocks, pairs), np.float64)
    per = -(-blocks // threads)
    for t in numba.prange(threads):
        b = np.zeros(BLOCK, np.float32)
        x = np.zeros((count, BLOCK), np.float64)
        lanes = np.empty(LANES, np.float64)
        for k in range(t * per, min(blocks, (t + 1) * per)):
            s, e = begins[k], begins[k + 1]
            size = e - s
            padded = -(-size // LANES) * LANES
            if deltas:
                block = base[s:e]
                for j in range(size):
                    b[j] = widen(block, j)
            for i in range(count):
                block, xi = models[i][s:e], x[i]
                if deltas:   # the task vector's float32 rounding, then exact in float64
                    for j in range(size):
                        xi[j] = f64(widen(block, j) - b[j])
                else:
                    for j in range(size):
                        xi[j] = f64(widen(block, j))
                for j in range(size, padded):
                    xi[j] = f64(0.0)
            p = 0
            for a in range(count):
                for c in range(a, count):
                    xa, xc = x[a], x[c]
                    lanes[:] = f64(0.0)
                    for j in range(0, padded, LANES):
                        for lane in range(LANES):
                            lanes[lane] += xa[j + lane] * xc[j + lane]
                    total = f64(0.0)
                    for lane in range(LANES):
                        total += lanes[lane]
                    partial[k, p] = total
                    p += 1
    for k in range(blocks):
        g, p = groups[k], 0
        for a in range(count):
            for c in range(a, count):
                gram[g, a, c] += partial[k, p]
                if c != a:
                    gram[g, c, a] += partial[k, p]
                p += 1


@_parallel
def gram_columns(base, models, deltas, start, cols, sums, threads):
    """sums[p, c] += x_a[j] x_b[j] (p: the pair a <= b, in the order a, then b) over the chunk's
    elements j of column c = (start + j) % cols, x_i as gram_chunk's, each product exact in
    float64: the Gram statistic per column (nuslerp_row_wise). Each thread owns a range of columns
    and adds a row's products into them row after row, so every column's sum runs in row order:
    the bits depend neither on the chunking nor on the thread count (gram.py's torch sums may add
    in another order: they agree to float64 rounding)."""
    n, count = models[0].shape[0], len(models)
    per = -(-cols // threads)
    first_row, last_row = start // cols, (start + n - 1) // cols
    for t in numba.prange(threads):
        c0, c1 = t * per, min(cols, (t + 1) * per)
        if c0 < c1:
            x = np.empty((count, c1 - c0), np.float64)
            for r in range(first_row, last_row + 1):
                lo, hi = max(r * cols + c0, start), min(r * cols + c1, start + n)
                if lo < hi:
                    width, at, col = hi - lo, lo - start, lo - r * cols
                    for i in range(count):
                        block, xi = models[i][at:at + width], x[i]
                        if deltas:   # the task vector's float32 rounding, then exact in float64
                            b = base[at:at + width]
                            for j in range(width):
                                xi[j] = f64(widen(block, j) - widen(b, j))
                        else:
                            for j in range(width):
                                xi[j] = f64(widen(block, j))
                    p = 0
                    for a in range(count):
                        for c in range(a, count):
                            xa, xc, into = x[a], x[c], sums[p, col:col + width]
                            for j in range(width):
                                into[j] += xa[j] * xc[j]
                            p += 1


@_parallel
def packed_histograms(base, models, hist, threads):
    """hist[i] += the packed 65536-bin histogram (selection.py) of |f32(models[i]) - f32(base)|.
    A thread's int32 counts cover at most its share of one call: callers keep n far below 2^31.
    Each thread counts its share into its own int32 bins; exact zeros, a third of a bf16 task
    vector, go to 8 rotating spare bins so consecutive increments of one bin do not wait on
    each other, and are added to bin 0 at the end."""
    n, count = base.shape[0], len(models)
    per = -(-n // (threads * BLOCK)) * BLOCK
    local = np.zeros((threads, count, BINS + 8), np.int32)
    for t in numba.prange(threads):
        b = np.empty(BLOCK, np.float32)
        keys = np.empty(BLOCK, np.uint32)
        end = min(n, (t + 1) * per)
        for s in range(t * per, end, BLOCK):
            size = min(BLOCK, end - s)
            block = base[s:s + size]
            for j in range(size):
                b[j] = widen(block, j)
            for i in range(count):
                block, bins = models[i][s:s + size], local[t, i]
                for j in range(size):
                    bits = as_bits(abs(widen(block, j) - b[j]))
                    key = (bits >> np.uint32(16)) | (np.uint32(NONZERO_LOW) if bits & np.uint32(0xFFFF) else no_bits)
                    keys[j] = np.uint32(BINS) + (np.uint32(j) & np.uint32(7)) if bits == no_bits else key
                for j in range(size):
                    bins[keys[j]] += 1
    for k in numba.prange(BINS):   # each bin's total, bins over the cores
        for i in range(count):
            for t in range(threads):
                hist[i, k] += local[t, i, k]
    for i in range(count):
        for t in range(threads):
            for k in range(BINS, BINS + 8):
                hist[i, 0] += local[t, i, k]


@_parallel
def bucket_histogram(base, model, bucket, hist, threads):
    """hist[k] += how many |f32(model) - f32(base)| have the high 16 bits `bucket` and the low 16
    bits k: selection.py's refine pass, for a threshold the packed histogram did not settle. Per
    thread int32 counts, as packed_histograms; the compare vectorizes, the rare count does not."""
    n = base.shape[0]
    per = -(-n // (threads * BLOCK)) * BLOCK
    local = np.zeros((threads, BINS), np.int32)
    high = np.uint32(bucket)
    for t in numba.prange(threads):
        bits = np.empty(BLOCK, np.uint32)
        bins = local[t]
        end = min(n, (t + 1) * per)
        for s in range(t * per, end, BLOCK):
            size = min(BLOCK, end - s)
            block, model_block = base[s:s + size], model[s:s + size]
            for j in range(size):
                bits[j] = as_bits(abs(widen(model_block, j) - widen(block, j)))
            for j in range(size):
                if bits[j] >> np.uint32(16) == high:
                    bins[bits[j] & np.uint32(0xFFFF)] += 1
    for k in numba.prange(BINS):
        for t in range(threads):
            hist[k] += local[t, k]


@_parallel
def warm_up(threads):
    """One parallel call that does nothing: numba's thread pool and code loader start in the
    loading thread, not in the merge's first kernel call. A kernel of its own, as warming with a
    real kernel compiled a signature (one model) that a first merge on a machine never uses (3 s)."""
    seen = np.zeros(threads, np.int64)
    for t in numba.prange(threads):
        seen[t] = t
    return seen.sum()
