"""Hot CPU loops compiled by numba, bit for bit the torch code they stand in for.

- fill_uniform, fill_uniform_rows: DARE / DELLA's draws (rng.py), of a tensor or of a pack of
  equal-sized tensors (one row each); fill_uniform_shared: a large tensor's over the cores. Philox4x32-10 in torch is ~80 whole-array int64
  operations per draw (~50 M draws/s on 2 cores), which made DARE and DELLA merges several times
  slower than TIES on the CPU; compiled, one element's ten rounds stay in registers (~300 M/s on
  one core). The arithmetic is rng.py's (uint64 products of 32-bit words, their high and low
  halves), then Triton's uint_to_uniform_float, every constant a uint64 or float32 so numba
  never widens to float64.
- della_drop_p: DELLA's per-row ranks and drop probabilities (plan.ranked_drop_p): a sort per
  row of |x| (the sign bit cleared in the kernel, which also declines Inf and NaN), the
  first-equal position of each magnitude, and the same float64 formula, one loop per row and
  rows over all cores, instead of ten whole-array operations; for the statistics' keep masks
  (plan.keep_masks) it also draws u and writes u >= p, so neither array is made.
- add_abs_bins: exactsum.AbsSum's per-exponent integer sums of significands (L1 norms: DARE's
  rescale, LiNeS alpha auto), one pass instead of five whole-array operations and a bincount;
  add_abs_bins_kept: the same for a task vector and its kept part at once, packing the keep mask,
  over all cores (integer bins per thread, added at the end: the same sums in any order).
- merge_chunk: the CPU backend's merge of one chunk for the plans without per-element side
  inputs (task arithmetic, linear, TIES, breadcrumbs, DARE with its draws or keep masks given,
  DELLA with its keep masks, Gram weights per tensor, row or column, the TALL mask; with LiNeS): every plan step of backends/cpu.py's torch path, the same float32 operations in the same
  order, in one pass over blocks of BLOCK elements that stay in L1 (~30 torch operations per
  chunk before, each a pass over memory). Each step is a loop over the block's elements, the
  innermost loop, so LLVM vectorizes it; a loop over models per element does not vectorize
  and was slower than torch (session 7's try).
- gram_chunk: the Gram statistic of slerp, nuslerp and model_stock (gram.py: the float64 sums
  of the products of every pair of inputs, per group), blocks over the cores and LANES float64
  sums per block, instead of a float64 copy of every input and a batched einsum per chunk (10x);
  gram_columns: per column (nuslerp_row_wise), column ranges over the cores, each column's sum
  in row order (llama-336m in-merge 2.5 s, against 4.8 s with gram.py's column sums in torch).
- packed_histograms: the packed 65536-bin histograms of |x_i| (selection.py) of TIES's and
  breadcrumbs' thresholds, per-thread counts over the cores, instead of seven torch operations
  and a single-threaded bincount per chunk and model; bucket_histogram: the low 16 bits of
  one bucket's elements (the refine pass of a threshold pass 1 did not settle), likewise.

Loading numba, LLVM and the cached machine code costs ~0.7 s, so a process uses them only once
its work reaches JIT_AFTER elements (`compiled(work)`: the work done in torch so far plus this
call's; a small draw counts as CALL_WORK), or, once a merge announced that much work
(`prefetch`), as soon as a background thread has loaded them: small merges never pay it, large
ones (10^9-10^11 elements, or 10^4 tiny tensors) run several times faster. numba is optional: without it, or with LINES_FAST_NO_NUMBA=1, the
torch code runs, and the tests check that the two agree.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import warnings
from types import SimpleNamespace
from typing import Callable

JIT_AFTER = 1 << 24
# What one small call costs in torch, in elements of work: a Philox draw is ~80 whole-array
# operations whatever its size, so 10^4 draws for tiny tensors count as the large draw they cost.
CALL_WORK = 1 << 14
# A call of this much work waits for prefetch()'s load rather than run in torch meanwhile: the load
# takes ~0.75 s, in which torch does ~1.2e8 elements of a Gram statistic or a TIES merge on 2 cores
# (llama-336m slerp: the 65M-element embedding's Gram in torch took 1.17 s during the load).
WAIT_WORK = 1 << 26
_work_in_torch = 0
_kernels: SimpleNamespace | None = None
_tried = False
_lock = threading.Lock()
_loader: threading.Thread | None = None   # prefetch()'s, while it loads
_loaded = threading.Event()
_notify: Callable[[str], None] | None = None   # where compile notices go (compile_notices)
_listening = False   # whether _compile_listener is registered with numba


def compiled(work: int) -> SimpleNamespace | None:
    """The compiled kernels once the work done in torch plus `work` reaches JIT_AFTER elements
    (from then on, whatever the work); else None, and the caller does these `work` elements in
    torch (they count). After prefetch(): None while its thread loads them (the merge goes on in
    torch; a call of WAIT_WORK or more waits for them), then the kernels."""
    global _work_in_torch
    if _loader is not None:   # prefetched for this merge: in use once loaded, whatever the work
        if work >= WAIT_WORK:   # a call this large is done sooner by waiting for the load than in torch
            _loaded.wait()
        if _loaded.is_set():
            return _kernels
        _work_in_torch += work
        return None
    if _work_in_torch + work < JIT_AFTER:
        _work_in_torch += work
        return None
    # Counted here too, so every later call gets them: a light call after a heavy one that loaded them.
    _work_in_torch = max(_work_in_torch, JIT_AFTER)
    return kernels()


def prefetch(work: int) -> None:
    """Load the kernels in a background thread if a merge of `work` elements of work will use
    them (work >= JIT_AFTER): numba's import, LLVM and its thread pool take ~0.75 s, which the
    merge's first tensors then spend in torch instead of waiting."""
    global _loader
    if _tried or _loader is not None or work < JIT_AFTER or os.environ.get("LINES_FAST_NO_NUMBA") == "1":
        return
    _loader = threading.Thread(target=_load_and_warm, name="lines-fast-jit", daemon=True)
    _loader.start()
    atexit.register(_loader.join)   # never let the interpreter finalize under a loading LLVM


def _load_and_warm() -> None:
    global _kernels
    try:
        found = kernels()
        with _lock:   # no parallel call of another thread's kernels() overlaps this one
            if found is not None:   # one tiny parallel call: the thread pool and the code loader start
                try:
                    found.warm_up(2)
                except Exception:   # kernels that cannot run are not handed out: torch does the work
                    _kernels = None
    finally:
        _loaded.set()


def kernels() -> SimpleNamespace | None:
    """The compiled kernels, or None where numba is unavailable (or LINES_FAST_NO_NUMBA=1)."""
    global _kernels, _tried
    with _lock:   # prefetch()'s thread may be loading them
        if not _tried:
            if os.environ.get("LINES_FAST_NO_NUMBA") != "1":
                try:
                    _kernels = _compile()
                except ImportError:
                    _kernels = None
            _tried = True
    return _kernels


BLOCK = 1024   # merge_chunk's and packed_histograms' block: a few float32 arrays of it stay in L1
# merge_chunk's `steps`: which of the plan's steps run (one bit each; a backend sets them from the plan).
STEP_BASE, STEP_DELTAS, STEP_TRIM, STEP_BAND, STEP_DROP = 1, 2, 4, 8, 16
STEP_DIVIDE, STEP_MULTIPLY, STEP_ELECT, STEP_NORMALIZE, STEP_KEPT = 32, 64, 128, 256, 512
STEP_TAU, STEP_TASK_SUM = 1024, 2048   # out = tau_m itself; also sum_i tau_i (LiNeS alpha auto's norms)
STEP_TALL = 4096   # the consensus (TALL) mask: +0 where fewer than k models matter
STEP_COPY = 8192   # the sum starts at -0.0, not +0.0 (consensus COPY: the lone product itself)
# Gram weights per group (group_weights [N, G]): element j's group is j // group_len (rows) or j % group_len (columns).
STEP_GROUP_ROWS, STEP_GROUP_COLUMNS = 16384, 32768


@contextlib.contextmanager
def compile_notices(log: Callable[[str], None]):
    """Within it, each kernel numba compiles (rather than loads from its on-disk cache) is
    announced through `log`, with the time it took: a first merge on a machine compiles each
    kernel it uses once per input types (merge_chunk: 10-20 s), which would otherwise look
    like a hang."""
    global _notify
    previous, _notify = _notify, log
    try:
        yield
    finally:
        _notify = previous


def _compile_listener(kernels: SimpleNamespace):
    """A numba event listener that tells _notify when one of `kernels` starts and ends compiling.
    numba raises "numba:compile" only on a cache miss, and also for the helpers a kernel calls:
    those are left out (the kernel's notice covers them)."""
    from numba.core import event

    # warm_up compiles in ~1 s in prefetch's background thread, which nobody waits for: not announced.
    ours = {id(fn): name for name, fn in vars(kernels).items() if name != "warm_up"}

    class Notices(event.Listener):
        def __init__(self):
            self.started: dict[int, float] = {}

        def on_start(self, ev):
            name = ours.get(id(ev.data["dispatcher"]))
            if name is not None and _notify is not None:
                self.started[id(ev.data)] = time.perf_counter()
                _notify(f"compiling CPU kernel {name} for these input types (first use on this machine; numba "
                        "caches it on disk for later runs)...")

        def on_end(self, ev):
            started = self.started.pop(id(ev.data), None)
            if started is not None and _notify is not None:
                # The end event carries the compile's exception, if any. Not Event.is_failed: numba 0.68's
                # is inverted (True when there was none).
                what = "failed to compile" if getattr(ev, "_exc_details", None) is not None else "compiled"
                _notify(f"{what} {ours[id(ev.data['dispatcher'])]} in {time.perf_counter() - started:.1f} s")

    return Notices()


def _compile() -> SimpleNamespace:
    with warnings.catch_warnings():
        # An unwritable package directory only costs the on-disk cache of the compiled code.
        warnings.simplefilter("ignore")
        from . import jit_kernels as k
    found = SimpleNamespace(fill_uniform=k.fill_uniform, fill_uniform_shared=k.fill_uniform_shared,
                            fill_uniform_rows=k.fill_uniform_rows,
                            add_abs_bins=k.add_abs_bins, della_drop_p=k.della_drop_p,
                            merge_chunk=k.merge_chunk, packed_histograms=k.packed_histograms,
                            bucket_histogram=k.bucket_histogram, gram_columns=k.gram_columns,
                            gram_chunk=k.gram_chunk, add_abs_bins_kept=k.add_abs_bins_kept, warm_up=k.warm_up)
    global _listening
    if not _listening:   # once: the kernels are the same objects however often they are looked up
        from numba.core import event

        event.register("numba:compile", _compile_listener(found))
        _listening = True
    return found
