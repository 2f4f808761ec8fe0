"""Fused merge: the per-element plan (lines_fast/plan.py) in one pass over its inputs.

One kernel family; the plan's steps are tl.constexpr switches (HAS_BASE, DELTAS, TRIM, CEIL,
DROP, INVERSE, SCALE_KEPT, ELECT, NORMALIZE), so each combination compiles to
straight-line code. Per element, all in float32 and in model order i = 0..N-1 exactly as
lines_fast/reference.py writes it:

    x_i    = f32(m_i) - f32(b)   (DELTAS)    or f32(m_i) (a soup)
    TRIM:    x_i = |x_i| >= t_i ? x_i : 0                         (t_i = inf keeps nothing)
    CEIL:    x_i = |x_i| <  c_i ? x_i : 0                         (a band's ceiling; inf drops nothing)
    DROP:    x_i = u_i >= p_i ? x_i : 0                           (u_i: Philox, lines_fast/rng.py)
    INVERSE: kept x_i / q_i;  SCALE_KEPT: x_i * f_i               (the rescale of kept values)
    c_i    = w_i * x_i;  acc = acc + c_i     from +0 (COPY: from -0.0): the election sum, or the weighted sum
    ELECT:   gamma = acc > 0 ? +1 : acc < 0 ? -1 : z (z = +1, or the official rule's majority sign); tau_m = sum_{c_i agreeing} c_i [/ sum_{agreeing} w_i]
    else:    tau_m = acc [/ sum_i w_i]
    TALL:    tau_m = #{i : |tau_i| >= lam |S - tau_i|} >= k ? tau_m : 0   (S = sum_j tau_j, raw)
    HAS_BASE and not DELTAS (a soup with LiNeS): tau_m = tau_m - f32(b)
    out    = b + scale * tau_m                 (two roundings, never an FMA); b where scale == 0

Election and disjoint merge in ONE loop over the models: the agreeing set is either the
models with c_i > 0 (gamma = +1) or those with c_i < 0 (gamma = -1), so the kernel keeps
both candidate numerators and denominators, each summed in model order, and picks one per
element once gamma is known. The picked sums are the reference's sums term for term (a
non-agreeing model adds 0), so values are identical and every input is read exactly once.

Inputs: `base` (any of bf16/fp16/fp32, absent for plain linear) and the N models as ONE
[N, model_stride] staging tensor of a single dtype (the models' common dtype, float32 when
they differ: widening is exact, so tau is unchanged). Per-model numbers travel in a float32
table [7, N] (lines_fast.plan.TABLE_ROWS): weights, trim thresholds, drop probabilities p_i,
inverse-rescale divisors q_i, L1 rescale factors f_i, band ceilings c_i, TALL ratios lambda_i.

Gram-weighted plans (GROUPED: slerp, nuslerp, model_stock) read w_i per element from a float32
[N, groups] table instead, at the element's group (lines_fast/gram.py: row j // L or column j % L).

Every division is tl.fdiv(..., ieee_rounding=True): Triton's plain `/` on float32 compiles
to div.full.f32 on NVIDIA, an approximation (up to 2 ulp), while torch divides exactly.

bf16 travels as its int16 bit pattern and is widened / rounded (to nearest even) with
integer operations: Triton's interpreter truncates float32 -> bf16 and mis-widens bf16
subnormals, and the integer form is exact on every device, so the interpreter tests prove
the very code the GPU runs.

The L1 switch turns the kernel into the "delta L1" reduction for LiNeS auto alpha: nothing
is written; each program stores sum |tau_m| (lambda = 1) of its block in float64, and the
host adds the partials in float64 in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lines_fast import rng
from lines_fast.methods import Coefficients, Consensus, Rescale, Sparsify
from lines_fast.plan import ElementPlan, TensorStats, f32, unsupported_steps

MAX_MODELS = 8
# GPU launch shape: 1024 elements in 4 warps = 8 per thread, i.e. 16-byte loads of bf16
# (ptxas for sm_90: 70 registers for TIES with N = 3, no spills). DARE keeps Philox state
# per element: 8 warps (4 elements per thread, 8-byte loads, still coalesced) halve its
# registers (150 -> 76 for N = 3; 255 -> 178 for N = 8).
BLOCK = 1024
NUM_WARPS = 4
NUM_WARPS_DROP = 8
# The interpreter runs one program at a time in numpy: bigger blocks, fewer Python loops.
INTERPRET_BLOCK = 4096


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------
# Device helpers (shared with select.py)
# ---------------------------------------------------------------------------------------

@triton.jit
def load_f32(ptrs, mask, BF16: tl.constexpr):
    """Load and widen to float32; BF16 means the pointer holds bf16 bit patterns as int16."""
    if BF16:
        raw = tl.load(ptrs, mask=mask, other=0)
        x = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0).to(tl.float32)
    return x


@triton.jit
def f32_to_bf16_bits(x):
    """float32 -> bf16 bit pattern (int16), round to nearest even (as torch rounds; no NaN here)."""
    bits = x.to(tl.int32, bitcast=True)
    # No overflow for non-NaN input: the largest pattern is 0x7F800000 (+inf) + 0x8000.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.int16)


@triton.jit
def uniform_from_bits(r0):
    """DARE's u from Philox's first word, exactly as lines_fast/rng.py derives it (Triton's own
    uint_to_uniform_float, written out so no Triton version's exports matter): read as int32,
    ~x where negative, times float32(4.6566127342e-10); 0 <= u < 1."""
    x = r0.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def nonfinite(x):
    """Inf or NaN, from the exponent bits (robust to any fast-math rewriting of x != x)."""
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


# ---------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------

@triton.jit
def _fused_merge_kernel(
    out_ptr, base_ptr, models_ptr, table_ptr, partial_ptr, task_partial_ptr, flags_ptr, group_weights_ptr,
    drop_ptr, n_elements, model_stride, drop_stride, elem_offset, seed, stream_id, scale, weight_sum, n_groups,
    group_len, tall_k, zero_sign,
    N: tl.constexpr, HAS_BASE: tl.constexpr, DELTAS: tl.constexpr, TRIM: tl.constexpr, CEIL: tl.constexpr,
    DROP: tl.constexpr, RANKED: tl.constexpr,
    INVERSE: tl.constexpr, SCALE_KEPT: tl.constexpr,
    ELECT: tl.constexpr, NORMALIZE: tl.constexpr, L1: tl.constexpr, TASK_SUM: tl.constexpr,
    CHECK_FINITE: tl.constexpr, GROUPED: tl.constexpr, GROUP_ROWS: tl.constexpr, TALL: tl.constexpr,
    COPY: tl.constexpr, BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 before the multiply: tensors can pass 2^31 elements.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    # Bit 0: the base had Inf/NaN; bit i + 1: model i had.
    bad = tl.zeros([BLOCK], dtype=tl.int32)

    if HAS_BASE:
        b = load_f32(base_ptr + offs, mask, BASE_BF16)
        if CHECK_FINITE:
            bad = bad | nonfinite(b).to(tl.int32)
    if GROUPED:
        # The weight of each element's group (lines_fast/gram.py): rows j // L or columns j % L
        # of the tensor's GLOBAL flat index j, so a chunked launch finds the same groups.
        gidx = offs + elem_offset
        if GROUP_ROWS:
            group = gidx // group_len
        else:
            group = gidx % group_len
    if DROP or RANKED:
        # DARE counter (lines_fast/rng.py): the GLOBAL flat index, so a chunked launch
        # (elem_offset > 0) draws the same mask as a whole-tensor launch.
        idx = offs + elem_offset
        c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
        c1 = (idx >> 32).to(tl.uint32)
        c2 = (offs * 0 + stream_id).to(tl.uint32)  # stream id may be >= 2^31: widen, then wrap

    if TALL:
        # The consensus mask needs S = sum_j tau_j before any model's step: a first read of the
        # block (the main loop's reads then come from cache).
        total = zero
        t_ptrs = models_ptr + offs
        for j in tl.static_range(N):
            total = total + (load_f32(t_ptrs, mask, MODELS_BF16) - b)
            t_ptrs += model_stride
        mattering = tl.zeros([BLOCK], dtype=tl.int32)

    if COPY:   # the sum starts at -0.0, which adds nothing: the lone product keeps -0.0 (passthrough)
        # From its bits: some Triton versions fill a constant equal to 0 with +0.0.
        acc = tl.full([BLOCK], -2147483648, tl.int32).to(tl.float32, bitcast=True)
    else:
        acc = zero
    raw = zero  # TASK_SUM: sum_i tau_i before any trim or drop, for ||sum tau||_1
    pos_num = zero
    pos_den = zero
    neg_num = zero
    neg_den = zero
    # Advance the row pointer instead of computing i * model_stride, which is int32.
    m_ptrs = models_ptr + offs
    for i in tl.static_range(N):
        x = load_f32(m_ptrs, mask, MODELS_BF16)
        m_ptrs += model_stride
        if CHECK_FINITE:
            bad = bad | (nonfinite(x).to(tl.int32) << (i + 1))
        if DELTAS:
            tau = x - b
        else:
            tau = x
        if TASK_SUM:
            if DELTAS:
                raw = raw + tau
            else:
                raw = raw + (x - b)
        if TALL:
            tall_lambda = tl.load(table_ptr + 6 * N + i)
            mattering += (tl.abs(tau) >= tall_lambda * tl.abs(total - tau)).to(tl.int32)
        if TRIM:
            t = tl.load(table_ptr + N + i)
            tau = tl.where(tl.abs(tau) >= t, tau, 0.0)
        if CEIL:
            c = tl.load(table_ptr + 5 * N + i)
            tau = tl.where(tl.abs(tau) < c, tau, 0.0)
        if DROP:
            p = tl.load(table_ptr + 2 * N + i)
            c3 = (offs * 0 + i).to(tl.uint32)
            r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, c2, c3)
            u = uniform_from_bits(r0)
            tau = tl.where(u >= p, tau, 0.0)
        if RANKED:
            # DELLA: each element's own drop probability (from its row's magnitude ranks, computed
            # by the host side), drawn from DELLA's stream: c3 = i + 2^16 (lines_fast/rng.py).
            p = tl.load(drop_ptr + i * drop_stride + offs, mask=mask, other=0.0)
            c3 = (offs * 0 + i + 65536).to(tl.uint32)
            r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, c2, c3)
            u = uniform_from_bits(r0)
            tau = tl.where(u >= p, tau, 0.0)
        if INVERSE:
            tau = tl.fdiv(tau, tl.load(table_ptr + 3 * N + i), ieee_rounding=True)
        if SCALE_KEPT:
            tau = tau * tl.load(table_ptr + 4 * N + i)
        if GROUPED:
            w = tl.load(group_weights_ptr + i * n_groups + group, mask=mask, other=0.0)
        else:
            w = tl.load(table_ptr + i)
        wt = w * tau
        acc = acc + wt
        if ELECT:
            # The agreeing set follows the weighted contribution's sign (as mergekit).
            pos = wt > 0
            neg = wt < 0
            pos_num = pos_num + tl.where(pos, wt, 0.0)
            pos_den = pos_den + tl.where(pos, w, 0.0)
            neg_num = neg_num + tl.where(neg, wt, 0.0)
            neg_den = neg_den + tl.where(neg, w, 0.0)

    if ELECT:
        # gamma = +1 where the sum is positive, and zero_sign (+1, or the official rule's majority
        # sign) where it is 0, -0.0 included
        up = (acc > 0) | ((acc == 0) & (zero_sign > 0))
        tau_m = tl.where(up, pos_num, neg_num)
        if NORMALIZE:
            den = tl.where(up, pos_den, neg_den)
            has = den != 0
            tau_m = tl.where(has, tl.fdiv(tau_m, tl.where(has, den, 1.0), ieee_rounding=True), 0.0)
    else:
        tau_m = acc
        if NORMALIZE:
            tau_m = tl.fdiv(tau_m, weight_sum, ieee_rounding=True)
    if TALL:
        tau_m = tl.where(mattering >= tall_k, tau_m, 0.0)
    if HAS_BASE and not DELTAS:
        tau_m = tau_m - b  # a soup with LiNeS: tau_MTL = soup - theta_0

    if L1:
        tl.store(partial_ptr + pid, tl.sum(tl.abs(tau_m).to(tl.float64), axis=0))
        if TASK_SUM:
            tl.store(task_partial_ptr + pid, tl.sum(tl.abs(raw).to(tl.float64), axis=0))
    else:
        if HAS_BASE:
            res = b + scale * tau_m
            # scale 0 returns the base bitwise (b + 0 * tau would turn -0.0 into +0.0).
            res = tl.where(scale == 0.0, b, res)
        else:
            res = tau_m
        if OUT_BF16:
            tl.store(out_ptr + offs, f32_to_bf16_bits(res), mask=mask)
        else:
            tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    if CHECK_FINITE:
        # The block's largest mask, not the OR of all: one element's mask names only inputs that
        # really hold Inf/NaN, and tl.max is a native reduction (a custom OR combine runs
        # element by element in Triton's interpreter, ~1 s per launch).
        tl.atomic_or(flags_ptr, tl.max(bad, 0), sem="relaxed")


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

def kernel_view(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor the kernel reads, is_bf16): bf16 travels as int16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    if t.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"kernels take bf16, fp16 or fp32 tensors, got {t.dtype}")
    return t, False


def staging_dtype(dtypes) -> torch.dtype:
    """One dtype for the [N, n] model staging tensor: the common one, else float32 (exact)."""
    dtypes = set(dtypes)
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def default_block(kernel=None) -> int:
    return INTERPRET_BLOCK if _interpreted(kernel or _fused_merge_kernel) else BLOCK


def vector_friendly_spans(n: int, block: int) -> list[tuple[int, int]]:
    """[(start, count)] launches covering [0, n): one, unless n is not a multiple of 16.

    Triton vectorizes a masked load only when it can prove the mask constant across the
    vector, i.e. when n_elements % 16 == 0 (it specializes integer arguments on that at
    launch). A ragged n would make EVERY load of the launch a 2-byte scalar load (see
    bench/compile_check.py), so the largest multiple of `block` goes in one launch and the
    ragged rest (< block elements) in a second.
    """
    if n % 16 == 0 or n < block:
        return [(0, n)] if n else []
    main = n - n % block
    return [(0, main), (main, n - main)]


# The plan's steps this kernel has a switch for; a plan with any other step is refused.
SUPPORTED = {
    "sparsify": {Sparsify.NONE, Sparsify.MAGNITUDE, Sparsify.RANDOM, Sparsify.BAND, Sparsify.RANKED},
    "rescale": {Rescale.NONE, Rescale.INVERSE, Rescale.L1},
    "consensus": {Consensus.NONE, Consensus.SIGN, Consensus.COPY},
    "coefficients": {Coefficients.GIVEN, Coefficients.SLERP, Coefficients.NUSLERP, Coefficients.MODEL_STOCK},
}


def unsupported(plan: ElementPlan) -> str | None:
    """Why the kernels cannot execute `plan`, or None when they can."""
    missing = unsupported_steps(plan, SUPPORTED)
    if missing is not None:
        return missing
    if not 1 <= plan.n_models <= MAX_MODELS:
        return f"the Triton kernels merge 1 to {MAX_MODELS} models, not {plan.n_models}"
    return None


def check_supported(plan: ElementPlan) -> None:
    reason = unsupported(plan)
    if reason is not None:
        raise ValueError(reason)


def plan_switches(plan: ElementPlan) -> dict[str, bool]:
    """The kernel's constexpr switches for a plan."""
    return dict(
        N=plan.n_models, HAS_BASE=plan.uses_base, DELTAS=plan.deltas, TRIM=plan.trims, CEIL=plan.band,
        DROP=plan.sparsify is Sparsify.RANDOM, RANKED=plan.ranked, INVERSE=plan.rescale is Rescale.INVERSE,
        SCALE_KEPT=plan.rescale is Rescale.L1, ELECT=plan.consensus is Consensus.SIGN, NORMALIZE=plan.normalize,
        GROUPED=plan.grouped, TALL=plan.tall_k > 0, COPY=plan.consensus is Consensus.COPY)


def launch_merge(out, base, models, table, plan: ElementPlan, *, n: int, scale: float = 1.0,
                 stream_id: int = 0, elem_offset: int = 0, partials=None, task_partials=None, flags=None,
                 group_weights=None, groups=None, zero_sign: float = 1.0, drop_p=None,
                 block: int | None = None) -> None:
    """Run the kernel over elements [0, n) of flat views already on the kernel's device.

    out: [>= n] of the output dtype (ignored when `partials` is given: the L1 variant).
    base: [>= n] or None (plain linear). models: [N, stride], rows of one dtype.
    table: ElementPlan.table(...). partials: float64 [cdiv(n, block)] for the L1 variant;
    task_partials (same shape, L1 variant only): also the partials of |sum_i tau_i| (untrimmed,
    the same float32 adds as ElementPlan.task_vector_sum), from the same read.
    flags: int32 [1], OR-ed with bits of inputs holding Inf/NaN (bit 0 base, i + 1 model i; nonzero
    iff some input has one, and every bit set names such an input), or None to skip the check. elem_offset: global flat index of element 0 (DARE counter).
    group_weights, groups (plan.grouped): float32 [N, G] on the device, and the tensor's gram.GroupView.
    drop_p (plan.ranked): float32 [N, >= n] on the device, each element's drop probability
    (ranked_drop_p over whole rows: see ranked_drop_probabilities).
    """
    if plan.grouped and (group_weights is None or groups is None):
        raise ValueError("a grouped plan needs group_weights and the tensor's groups")
    if plan.ranked and drop_p is None:
        raise ValueError("a ranked (DELLA) plan needs each element's drop probability (drop_p)")
    if n == 0:
        return
    block = block or default_block()
    l1 = partials is not None
    if task_partials is not None and not (l1 and plan.uses_base):
        raise ValueError("task_partials needs the L1 variant (partials) and a base")
    if plan.uses_base:
        base_k, base_bf16 = kernel_view(base)
    else:
        base_k, base_bf16 = models, False  # never read
    models_k, models_bf16 = kernel_view(models)
    if l1:
        out_k, out_bf16 = partials, False  # never written
    else:
        out_k, out_bf16 = kernel_view(out)
    assert models.shape[0] == plan.n_models and models.stride(1) == 1
    for start, count in vector_friendly_spans(n, block):
        # A second span starts at a multiple of `block`: its views keep their alignment, and
        # its first program's partial lands right after the first span's last one.
        _fused_merge_kernel[(triton.cdiv(count, block),)](
            out_k[start:] if not l1 else out_k, base_k[start:] if plan.uses_base else base_k, models_k[:, start:],
            table, partials[start // block:] if l1 else table,
            task_partials[start // block:] if task_partials is not None else table,
            flags if flags is not None else table, group_weights if plan.grouped else table,
            drop_p[:, start:] if plan.ranked else table,
            count, models.stride(0), drop_p.stride(0) if plan.ranked else 0,
            int(elem_offset) + start, int(plan.seed), int(stream_id), f32(scale),
            plan.weight_sum, groups.groups if plan.grouped else 1, groups.group_len if plan.grouped else 1,
            int(plan.tall_k), f32(zero_sign),
            **plan_switches(plan), L1=l1, TASK_SUM=task_partials is not None, CHECK_FINITE=flags is not None,
            GROUP_ROWS=bool(plan.grouped and groups.by_rows),
            BASE_BF16=base_bf16, MODELS_BF16=models_bf16, OUT_BF16=out_bf16, BLOCK=block,
            num_warps=NUM_WARPS_DROP if plan.drops else NUM_WARPS,
            # The reference rounds every product and sum: no fused multiply-add (an FMA can flip
            # the sign of a cancelling election sum such as 0.3 * x + 0.3 * -x).
            enable_fp_fusion=False,
        )


def stage_models(models, device=None) -> torch.Tensor:
    """The models' flat values as one contiguous [N, n] tensor of their staging dtype."""
    dtype = staging_dtype(m.dtype for m in models)
    device = device or models[0].device
    return torch.stack([m.reshape(-1).to(device=device, dtype=dtype) for m in models])


def fused_merge(base, models, plan: ElementPlan, *, name: str, stats: TensorStats | None = None,
                scale: float = 1.0, out_dtype: torch.dtype | None = None, elem_offset: int = 0,
                block: int | None = None, flags=None) -> torch.Tensor:
    """One-call merge of whole tensors already on the kernel's device; returns the flat output.

    For tests and simple callers; the backend streams chunks through launch_merge instead.
    elem_offset: global index of element 0 when `base`/`models` are one chunk of a larger tensor.
    """
    check_supported(plan)
    staged = stage_models(models)
    ref = base if base is not None else models[0]
    n = ref.numel()
    out = torch.empty(n, dtype=out_dtype or ref.dtype, device=ref.device)
    table = plan.table(stats, ref.device)
    drop_p = ranked_drop_probabilities(plan, base.reshape(-1), staged, plan.rank_row_len(ref.shape, name)) \
        if plan.ranked else None
    launch_merge(out, None if base is None else base.reshape(-1), staged, table, plan, n=n, scale=scale,
                 stream_id=rng.tensor_stream_id(name), elem_offset=elem_offset, flags=flags, block=block,
                 drop_p=drop_p, **tensor_args(plan, stats, ref.shape, ref.device))
    return out


def ranked_drop_probabilities(plan: ElementPlan, base, models, row_len: int) -> torch.Tensor:
    """float32 [N, n]: DELLA's drop probability of each element of whole rows (n a multiple of
    row_len) of flat base / models [N, n] on the device: ElementPlan.ranked_drop_p of tau_i."""
    base32 = base.float()
    rows = [plan.ranked_drop_p((models[i].float() - base32).view(-1, row_len), i).reshape(-1)
            for i in range(plan.n_models)]
    return torch.stack(rows)


def tensor_args(plan: ElementPlan, stats: TensorStats | None, shape, device) -> dict:
    """launch_merge's per-tensor extras: group_weights and groups for a tensor of `shape` (Gram
    weights), and the elected sign at a zero sum (the official rule)."""
    extras = {"zero_sign": plan.zero_sign(stats)} if plan.official else {}
    if not plan.grouped:
        return extras
    from lines_fast.gram import group_view

    return {**extras, "group_weights": stats.group_weights.to(device),
            "groups": group_view(tuple(shape), plan.group_by)}


def fused_delta_l1(base, models, plan: ElementPlan, *, name: str = "", stats: TensorStats | None = None,
                   block: int | None = None) -> float:
    """sum_j |tau_MTL[j]| (lambda = 1) of whole tensors on the kernel's device, in float64."""
    if not plan.uses_base:
        raise ValueError("plain linear has no task vector (no base): its delta L1 is undefined")
    block = block or default_block()
    staged = stage_models(models)
    n = base.numel()
    partials = torch.empty(max(1, triton.cdiv(n, block)), dtype=torch.float64, device=base.device)
    partials.zero_()
    drop_p = ranked_drop_probabilities(plan, base.reshape(-1), staged, plan.rank_row_len(base.shape, name)) \
        if plan.ranked else None
    launch_merge(None, base.reshape(-1), staged, plan.table(stats, base.device), plan, n=n,
                 stream_id=rng.tensor_stream_id(name), partials=partials, block=block, drop_p=drop_p,
                 **tensor_args(plan, stats, base.shape, base.device))
    return float(partials.sum())
