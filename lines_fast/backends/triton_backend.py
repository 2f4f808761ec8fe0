"""TritonBackend: the fused Triton kernels on a GPU, or on CPU tensors in Triton's interpreter.

device="cuda": every tensor goes host -> GPU -> host in PARTS that fit a device slot (all
    of a tensor when it fits, so TIES selects and merges from one host-to-device copy). Two
    slots alternate, so three things overlap:
        upload(t)     host copies part t from its memory-mapped view into a small ring of
                      pinned, reused pieces; each piece goes to slot t%2 on the copy stream
        compute(t-1)  the kernel runs on the compute stream (launched last iteration)
        finish(t-1)   the D2H stream copies part t-1's output back through a ring of pinned
                      pieces into the job's CPU output tensor
    Device memory stays bounded by two slots (max_resident_bytes each) plus the pinned rings.
    Tensors bigger than a slot go in several parts; the element offset of each part feeds the
    DARE counter, so masks never depend on the chunking.
device="interpret": the same code path with CPU tensors, no streams and no pinned memory:
    the kernels run in Triton's interpreter, which must be chosen before any kernel module is
    imported: call enable_interpreter() first (the CLI does, for --device interpret).

merge_many yields (job, output) in job order, one part behind the uploads: at most two parts
(so two jobs, plus the one being read ahead) are held at once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
from dataclasses import replace
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import NonFiniteInput
from ..exactsum import AbsSum
from ..gram import group_view, new_gram
from ..plan import (ElementPlan, TensorStats, add_gram, add_kept_l1, elected_sign_sum, factors_from_sums,
                    group_weights)
from ..selection import BINS, nonfinite_count, tensor_thresholds
from .base import MergeJob

_ALIGN = 256            # byte alignment of every view carved from a slot (16-byte vector loads)
_MAX_PART = 1 << 30     # elements per part: keeps every per-launch int32 count safe
_PAGE = 4096
_PART_MULTIPLE = 1024   # see kernels.merge.vector_friendly_spans
_STATS_CHUNK = 1 << 24  # elements per torch step of the L1 rescale statistic (~1 GB of temporaries)


# ---------------------------------------------------------------------------------------
# Choosing compiled or interpreted kernels, and importing them
# ---------------------------------------------------------------------------------------

def enable_interpreter() -> None:
    """Make the kernels run in Triton's interpreter (on CPU tensors). Call before any kernel import.

    Triton fixes a kernel as compiled or interpreted when its module is imported, so this
    must run before lines_fast.kernels is imported (and, to be safe with every Triton
    version, before triton itself is).
    """
    os.environ["TRITON_INTERPRET"] = "1"
    merge = sys.modules.get("lines_fast.kernels.merge")
    if merge is not None and not merge._interpreted(merge._fused_merge_kernel):
        raise RuntimeError(
            "The Triton kernels were already imported in compiled mode, so they cannot run in the "
            "interpreter in this process. Choose --device interpret (enable_interpreter()) at "
            "startup, before anything imports lines_fast.kernels, or set TRITON_INTERPRET=1.")


def import_kernels():
    """(merge, select) kernel modules, importable from an install or a source checkout.

    setup.py installs the top-level kernels/ folder as lines_fast.kernels. In a checkout that
    was not pip-installed, register kernels/ under that name so the imports are the same.
    """
    try:
        from lines_fast.kernels import merge, select
    except ModuleNotFoundError as err:
        if err.name not in ("lines_fast.kernels", "lines_fast.kernels.merge", "lines_fast.kernels.select"):
            raise
        folder = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "lines_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None or not folder.is_dir():
            raise
        package = importlib.util.module_from_spec(spec)
        sys.modules["lines_fast.kernels"] = package
        spec.loader.exec_module(package)
        from lines_fast.kernels import merge, select
    return merge, select


# ---------------------------------------------------------------------------------------
# Moving bytes: host <-> device
# ---------------------------------------------------------------------------------------

class _HostMover:
    """device="interpret": the 'device' is the CPU, so moving is a plain copy and nothing is async."""

    def __init__(self):
        self.device = torch.device("cpu")

    def computing(self):
        return nullcontext()

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def uploads_done(self):
        return None

    def wait(self, event, stream_name: str) -> None:
        pass

    def mark(self):
        return None

    def download(self, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        dst.copy_(src)

    def synchronize(self) -> None:
        pass


class _CudaMover:
    """Host <-> GPU copies through rings of pinned, reused pieces on two side streams.

    Upload: the host copies piece p from the (memory-mapped) source into a pinned piece while
    the copy stream still moves piece p-1 to the GPU. Download: the D2H stream fills pinned
    pieces while the host empties earlier ones into the destination. Kernels run on a third
    stream; events order the three.
    """

    def __init__(self, device: torch.device, piece_bytes: int, ring: int):
        self.device = device
        self.piece_bytes = piece_bytes
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)
        self._pins_in = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(ring)]
        self._pins_out = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(ring)]
        self._in_events: list = [None] * ring
        self._next_in = 0

    def computing(self):
        return torch.cuda.stream(self.compute)

    def _pieces(self, n: int, itemsize: int):
        step = max(1, self.piece_bytes // itemsize)
        for start in range(0, n, step):
            yield start, min(n, start + step)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for a, b in self._pieces(dst.numel(), max(dst.element_size(), src.element_size())):
            j = self._next_in
            self._next_in = (j + 1) % len(self._pins_in)
            if self._in_events[j] is not None:
                self._in_events[j].synchronize()  # the pinned piece's previous copy has left
            pin = self._pins_in[j][: (b - a) * dst.element_size()].view(dst.dtype)
            pin.copy_(src[a:b])  # the read (page faults) and any widening happen here
            with torch.cuda.stream(self.h2d):
                dst[a:b].copy_(pin, non_blocking=True)
                self._in_events[j] = torch.cuda.Event()
                self._in_events[j].record(self.h2d)

    def uploads_done(self):
        event = torch.cuda.Event()
        event.record(self.h2d)
        return event

    def wait(self, event, stream_name: str) -> None:
        if event is not None:
            getattr(self, stream_name).wait_event(event)

    def mark(self):
        """An event at the current end of the compute stream."""
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def download(self, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        """dst (CPU) = src (GPU), after `after`; returns when dst is filled."""
        if after is not None:
            self.d2h.wait_event(after)
        pending = deque()
        for k, (a, b) in enumerate(self._pieces(src.numel(), src.element_size())):
            if len(pending) == len(self._pins_out):
                self._drain(*pending.popleft())
            pin = self._pins_out[k % len(self._pins_out)][: (b - a) * src.element_size()].view(src.dtype)
            with torch.cuda.stream(self.d2h):
                pin.copy_(src[a:b], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.d2h)
            pending.append((event, pin, dst[a:b]))
        while pending:
            self._drain(*pending.popleft())

    @staticmethod
    def _drain(event, pin, dst) -> None:
        event.synchronize()
        dst.copy_(pin)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class _Slot:
    """Device memory for one part in flight: one raw byte buffer carved into typed views."""

    def __init__(self, mover):
        self.mover = mover
        self.buffer: torch.Tensor | None = None
        self.released = None  # event: the last kernels that read this slot are done

    def carve(self, layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        nbytes = [math.prod(shape) * dtype.itemsize for dtype, shape in layout]
        sizes = [-(-max(b, 1) // _ALIGN) * _ALIGN for b in nbytes]
        total = sum(sizes)
        if self.buffer is None or self.buffer.numel() < total:
            # Growing: wait until nothing uses the old buffer before freeing it.
            self.mover.synchronize()
            self.buffer = None
            with self.mover.computing():
                self.buffer = torch.empty(total, dtype=torch.uint8, device=self.mover.device)
        views, offset = [], 0
        for (dtype, shape), count, size in zip(layout, nbytes, sizes):
            views.append(self.buffer[offset:offset + count].view(dtype).view(shape))
            offset += size
        return views


@dataclass
class _Part:
    """Elements [start, stop) of one job's flat tensors, uploaded to a slot."""

    job: MergeJob
    out: torch.Tensor  # the job's CPU output (its shape)
    start: int
    stop: int
    last: bool
    stats: TensorStats | None = None  # the job's complete stats, once found
    slot: _Slot | None = None
    views: dict | None = None
    piece: torch.Tensor | None = None  # a streamed job's (MergeJob.stream): this part's own output


def _touch_pages(tensors) -> None:
    """Fault in the pages behind memory-mapped tensors (one byte per page) ahead of use."""
    for t in tensors:
        if t is not None and t.numel():
            t.reshape(-1).view(torch.uint8)[::_PAGE].sum()


def _read_ahead(jobs: Iterable[MergeJob], enabled: bool) -> Iterator[MergeJob]:
    """Yield jobs in order while a thread faults in the next job's pages."""
    jobs = iter(jobs)
    current = next(jobs, None)
    while current is not None:
        following = next(jobs, None)
        reader = None
        # Not for a streamed job: touching all its pages would map the whole tensor at once.
        if enabled and following is not None and not following.stream:
            reader = threading.Thread(target=_touch_pages, args=([following.base, *following.models],), daemon=True)
            reader.start()
        try:
            yield current
        finally:
            if reader is not None:
                reader.join()
        current = following


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------

class TritonBackend:
    """Backend protocol (lines_fast/backends/base.py) on the fused Triton kernels.

    chunk_elements: elements per part (default: as many as fit max_resident_bytes); tests
    set it small to force chunking. max_resident_bytes: device bytes of one slot (cuda).
    piece_bytes / ring: size and count of the pinned staging pieces (cuda). block: kernel
    block size override (tests).
    """

    def __init__(self, device: str = "cuda", *, chunk_elements: int | None = None,
                 max_resident_bytes: int = 4 << 30, piece_bytes: int = 64 << 20, ring: int = 3,
                 check_finite: bool = True, read_ahead: bool = True, block: int | None = None):
        if device not in ("cuda", "interpret") and not str(device).startswith("cuda:"):
            raise ValueError(f"TritonBackend device must be 'cuda' or 'interpret', got {device!r}")
        interpret = device == "interpret"
        if interpret:
            enable_interpreter()
        elif os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("TRITON_INTERPRET=1 is set, so the kernels cannot be compiled for the GPU; "
                               "unset it or use device='interpret'.")
        self._merge, self._select = import_kernels()
        if self._merge._interpreted(self._merge._fused_merge_kernel) != interpret:
            raise RuntimeError("The Triton kernels were imported in the other mode (compiled vs interpreted) "
                               "than this backend needs; choose the device before importing lines_fast.kernels.")
        self.name = "interpret" if interpret else "cuda"
        if interpret:
            self._mover = _HostMover()
            default_chunk = 1 << 20
        else:
            if not torch.cuda.is_available():
                raise RuntimeError("TritonBackend('cuda') needs a CUDA GPU; none is visible.")
            self._mover = _CudaMover(torch.device(device), piece_bytes, ring)
            default_chunk = None
        self.chunk_elements = chunk_elements or default_chunk
        self.max_resident_bytes = max_resident_bytes
        self.check_finite = check_finite
        self.read_ahead = read_ahead
        self.block = block
        self._slots = [_Slot(self._mover), _Slot(self._mover)]
        self._turn = 0

    # -- reporting ------------------------------------------------------------------------
    def peak_gpu_bytes(self) -> int:
        """torch.cuda.max_memory_allocated on this backend's GPU (0 in the interpreter)."""
        if self.name != "cuda":
            return 0
        return torch.cuda.max_memory_allocated(self._mover.device)

    # -- parts ----------------------------------------------------------------------------
    def _part_ranges(self, numel: int, bytes_per_element: int, row: int | None = None) -> list[tuple[int, int]]:
        """Parts of at most a slot each; of whole rows of `row` elements where given (DELLA ranks
        each row)."""
        size = self.chunk_elements or max(1, self.max_resident_bytes // max(1, bytes_per_element))
        size = max(1, min(size, _MAX_PART))
        if size > _PART_MULTIPLE:  # parts of a multiple of 1024 keep every launch vectorized
            size -= size % _PART_MULTIPLE
        if row is not None:
            size = max(row, size - size % row)
        return [(s, min(numel, s + size)) for s in range(0, numel, size)] or [(0, 0)]

    @staticmethod
    def _row(job: MergeJob, plan: ElementPlan) -> int | None:
        """DELLA's row length for this job (its parts and chunks hold whole rows), else None."""
        return plan.rank_row_len(job.models[0].shape, job.name) if plan.ranked else None

    def _drop_p(self, job: MergeJob, plan: ElementPlan, views: dict) -> dict:
        """launch_merge's drop_p for a part of whole rows on the device (DELLA), else nothing."""
        if not plan.ranked:
            return {}
        with self._mover.computing():
            return {"drop_p": self._merge.ranked_drop_probabilities(plan, views["base"], views["models"],
                                                                    self._row(job, plan))}

    @staticmethod
    def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(-1)

    def _upload(self, base, models, start: int, stop: int, extra: dict) -> tuple[_Slot, dict]:
        """Upload elements [start, stop) of base and models into the next slot.

        extra: name -> (dtype, shape) of scratch views to carve beside the inputs (output,
        flags, partials). Returns the slot and its views: "base", "models" ([N, stride]), extras.
        """
        slot = self._slots[self._turn]
        self._turn ^= 1
        n = stop - start
        stride = -(-n // 16) * 16 if len(models) > 1 else n  # row starts stay 16-element aligned
        mdtype = self._merge.staging_dtype(m.dtype for m in models)
        layout = {"models": (mdtype, (len(models), stride))}
        if base is not None:
            layout["base"] = (base.dtype, (n,))
        layout.update(extra)
        views = dict(zip(layout, slot.carve(list(layout.values()))))
        views["models"] = views["models"][:, :n]
        # The kernels that last read this slot must be done before new bytes land in it.
        self._mover.wait(slot.released, "h2d")
        if base is not None:
            self._mover.upload(views["base"], base[start:stop])
        for i, m in enumerate(models):
            self._mover.upload(views["models"][i], m[start:stop])
        self._mover.wait(self._mover.uploads_done(), "compute")
        return slot, views

    def _release(self, slot: _Slot):
        slot.released = self._mover.mark()
        return slot.released

    # -- statistics -----------------------------------------------------------------------
    def _histograms(self, base, models, buckets=None) -> torch.Tensor:
        """int64 CPU [M, BINS] histograms of |models[i] - base| over whole tensors (every part).

        buckets None: packed histograms (selection.py), all models in one launch per part.
        buckets[i] = b: low-bits histogram of model i's elements in bucket b.
        """
        base = self._flat(base)
        models = [self._flat(m) for m in models]
        m_count = len(models)
        per_element = base.element_size() + m_count * self._merge.staging_dtype(m.dtype for m in models).itemsize
        with self._mover.computing():
            total = torch.zeros(m_count, BINS, dtype=torch.int64, device=self._mover.device)
            hist32 = torch.zeros(m_count, BINS, dtype=torch.int32, device=self._mover.device)
        for start, stop in self._part_ranges(base.numel(), per_element):
            slot, views = self._upload(base, models, start, stop, {})
            with self._mover.computing():
                n, rows = stop - start, views["models"]
                if buckets is None:
                    self._select.launch_magnitude_histogram(hist32, views["base"], rows, n=n, block=self.block)
                else:
                    for i, bucket in enumerate(buckets):
                        self._select.launch_magnitude_histogram(hist32[i:i + 1], views["base"], rows[i:i + 1], n=n,
                                                                bucket=bucket, block=self.block)
                total += hist32
                hist32.zero_()
            self._release(slot)
        with self._mover.computing():
            return total.cpu()

    def _check_histogram(self, hist: torch.Tensor, name: str, base, models) -> None:
        """Packed bins of buckets >= 0x7F80 hold Inf/NaN magnitudes: find the input with Inf/NaN."""
        if not self.check_finite or nonfinite_count(hist) == 0:
            return
        if not bool(torch.isfinite(base).all()):
            raise NonFiniteInput(name, -1)
        for i, m in enumerate(models):
            if not bool(torch.isfinite(m).all()):
                raise NonFiniteInput(name, i)
        # Finite inputs whose difference overflowed: a legitimate (if odd) infinite |tau|.

    def magnitude_histograms(self, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        hist = self._histograms(base, models)
        self._check_histogram(hist, "", base, models)
        return hist

    def magnitude_histogram(self, base: torch.Tensor, model: torch.Tensor,
                            bucket: int | None = None) -> torch.Tensor:
        hist = self._histograms(base, [model], None if bucket is None else [bucket])
        if bucket is None:
            self._check_histogram(hist, "", base, [model])
        return hist[0]

    def expect(self, plan: ElementPlan, elements: int) -> None:
        pass

    def supports(self, plan: ElementPlan) -> str | None:
        return self._merge.unsupported(plan)

    def releasing(self, job: MergeJob):
        """Nothing to do here: this backend reads a tensor's inputs once per pass, in parts, and
        the engine releases them after the tensor; a streamed job's merge releases each part
        once it is uploaded (_streamed_parts)."""
        return contextlib.nullcontext()

    def _streamed_thresholds(self, job: MergeJob, plan: ElementPlan) -> list[tuple[float, ...]]:
        """Tensor-scope thresholds of a job bigger than a slot: histogram passes over its parts."""
        try:
            return tensor_thresholds(self, job.base, job.models, plan.magnitude_ranks(job.base.numel()))
        except NonFiniteInput as err:
            raise NonFiniteInput(job.name, err.model_index) from None

    def _resident_thresholds(self, job: MergeJob, plan: ElementPlan, views: dict) -> list[tuple[float, ...]]:
        """Tensor-scope thresholds of a job whose whole tensor sits in `views`: no second upload."""
        with self._mover.computing():
            thresholds, hist = self._select.resident_thresholds(
                views["base"], views["models"], plan.magnitude_ranks(job.base.numel()), n=job.base.numel(),
                block=self.block)
        self._check_histogram(hist, job.name, job.base, job.models)
        return thresholds

    def _rescale_factors(self, job: MergeJob, plan: ElementPlan, stats: TensorStats, views: dict | None) -> tuple:
        """L1 rescale factors from exact sums on the device, over the resident tensor or its parts."""
        totals, kepts = [AbsSum() for _ in job.models], [AbsSum() for _ in job.models]

        row = self._row(job, plan)
        step = _STATS_CHUNK if row is None else max(row, _STATS_CHUNK - _STATS_CHUNK % row)

        def add(part: dict, offset: int) -> None:
            rows, n = list(part["models"]), part["base"].numel()
            with self._mover.computing():
                # In sub-chunks (of whole rows for DELLA): the torch steps widen and draw per element
                # (~60 bytes each), and device memory must stay bounded by the slots.
                for a in range(0, n, step):
                    b = min(n, a + step)
                    add_kept_l1(plan, part["base"][a:b], [r[a:b] for r in rows], stats, job.name, offset + a,
                                totals, kepts, row)

        self._each_part(job, plan, views, add)
        return factors_from_sums(totals, kepts)

    def _each_part(self, job: MergeJob, plan: ElementPlan, views: dict | None, add) -> None:
        """Call add(part_views, offset) over the whole tensor on the device: once over `views`
        when it is all resident, else over freshly uploaded parts."""
        if views is not None:
            add(views, 0)
            return
        base = self._flat(job.base) if plan.uses_base or plan.deltas else None
        models = [self._flat(m) for m in job.models]
        per_element = (base.element_size() if base is not None else 0) + \
            len(models) * self._merge.staging_dtype(m.dtype for m in models).itemsize
        for start, stop in self._part_ranges(models[0].numel(), per_element, self._row(job, plan)):
            slot, part = self._upload(base, models, start, stop, {})
            add(part, start)
            self._release(slot)

    def _group_weights(self, job: MergeJob, plan: ElementPlan, views: dict | None) -> torch.Tensor:
        """The Gram weights (lines_fast/gram.py) of the tensor, its Gram matrix summed on the device."""
        view = group_view(tuple(job.models[0].shape), plan.group_by)
        with self._mover.computing():
            gram = new_gram(view, len(job.models), device=self._mover.device)

        def add(part: dict, offset: int) -> None:
            rows, n = list(part["models"]), part["models"].shape[1]
            with self._mover.computing():
                for a in range(0, n, _STATS_CHUNK):
                    b = min(n, a + _STATS_CHUNK)
                    base = part["base"][a:b] if plan.deltas else None
                    add_gram(plan, base, [r[a:b] for r in rows], offset + a, view, gram)

        self._each_part(job, plan, views, add)
        with self._mover.computing():
            return group_weights(plan, gram)

    def tensor_stats(self, job: MergeJob, plan: ElementPlan, views: dict | None = None) -> TensorStats:
        """job.stats completed with what the plan needs: tensor-scope thresholds and L1 rescale
        factors, from `views` (the whole tensor already on the device) when given."""
        stats = job.stats or TensorStats()
        need_thresholds, need_factors, need_weights = plan.missing(stats)
        if need_weights:
            stats = replace(stats, group_weights=self._group_weights(job, plan, views))
        if need_thresholds:
            if plan.threshold_scope != "tensor":
                raise ValueError(f"{job.name}: global-scope trimming needs thresholds from the engine")
            found = (self._resident_thresholds(job, plan, views) if views is not None
                     else self._streamed_thresholds(job, plan))
            stats = plan.stats_from_thresholds(found, stats)
        if need_factors:
            stats = replace(stats, factors=self._rescale_factors(job, plan, stats, views))
        return stats

    def _norms(self, job: MergeJob, plan: ElementPlan, *, with_task_sum: bool) -> tuple[float, float, TensorStats]:
        """(‖Σ τ_i‖₁ or 0.0, ‖τ_MTL‖₁, stats) from ONE upload of each part. A job missing stats
        gets them here too, from the same upload when the tensor fits one slot."""
        from ..rng import tensor_stream_id

        merge = self._merge
        if not plan.uses_base:
            raise ValueError("plain linear (no base) has no merged task vector")
        base = self._flat(job.base)
        models = [self._flat(m) for m in job.models]
        per_element = base.element_size() + len(models) * merge.staging_dtype(m.dtype for m in models).itemsize
        ranges = self._part_ranges(base.numel(), per_element, self._row(job, plan))
        stats = job.stats
        if any(plan.missing(stats)) and len(ranges) > 1:
            stats = self.tensor_stats(job, plan)  # the statistics need the whole tensor first
        block = self.block or merge.default_block()
        task_sums, deltas, table = [], [], None
        for start, stop in ranges:
            n = stop - start
            programs = max(1, -(-n // block))
            extra = {"partials": (torch.float64, (programs,))}
            if with_task_sum:
                extra["task_partials"] = (torch.float64, (programs,))
            slot, views = self._upload(base, models, start, stop, extra)
            if table is None:
                if any(plan.missing(stats)):
                    stats = self.tensor_stats(job, plan, views)
                with self._mover.computing():
                    table = plan.table(stats, self._mover.device)
            with self._mover.computing():
                partials, task_partials = views["partials"], views.get("task_partials")
                partials.zero_()
                if with_task_sum:
                    task_partials.zero_()
                merge.launch_merge(None, views["base"], views["models"], table, plan, n=n,
                                   stream_id=tensor_stream_id(job.name), elem_offset=start, partials=partials,
                                   task_partials=task_partials, block=block, **self._drop_p(job, plan, views),
                                   **merge.tensor_args(plan, stats, job.models[0].shape, self._mover.device))
                deltas.append(partials.sum())  # float64, fixed order: deterministic
                if with_task_sum:
                    task_sums.append(task_partials.sum())
            self._release(slot)
        with self._mover.computing():
            task_total = float(torch.stack(task_sums).sum()) if with_task_sum and task_sums else 0.0
            return task_total, float(torch.stack(deltas).sum()) if deltas else 0.0, stats or TensorStats()

    def task_vector_sum_l1(self, base: torch.Tensor, models: list[torch.Tensor]) -> float:
        plan = ElementPlan.task_vector_sum(len(models))
        return self._norms(MergeJob("", base, models, None, 1.0, torch.float32), plan, with_task_sum=False)[1]

    def elected_sign_sum(self, job: MergeJob, plan: ElementPlan) -> int:
        """sum_j sign(sum_i w_i trim(tau_i)[j]) over the tensor, on the device (the official rule's
        majority sign); integers, so parts add exactly."""
        stats = self.tensor_stats(job, plan)
        found = []

        def add(part: dict, offset: int) -> None:
            rows, n = list(part["models"]), part["base"].numel()
            with self._mover.computing():
                for a in range(0, n, _STATS_CHUNK):
                    b = min(n, a + _STATS_CHUNK)
                    found.append(elected_sign_sum(plan, part["base"][a:b], [r[a:b] for r in rows], stats, job.name,
                                                  offset + a))

        self._each_part(job, plan, None, add)
        return sum(found)

    def delta_norms(self, job: MergeJob, plan: ElementPlan,
                    with_task_sum: bool = True) -> tuple[float, float, TensorStats]:
        return self._norms(job, plan, with_task_sum=with_task_sum)

    # -- merging --------------------------------------------------------------------------
    def _bytes_per_element(self, job: MergeJob, plan) -> int:
        size = len(job.models) * self._merge.staging_dtype(m.dtype for m in job.models).itemsize
        if plan.uses_base:
            size += job.base.element_size()
        return size + job.out_dtype.itemsize

    def merge_many(self, jobs: Iterable[MergeJob],
                   plan: ElementPlan) -> Iterator[tuple[MergeJob, torch.Tensor, TensorStats]]:
        inflight: _Part | None = None
        call_plan = plan
        for job in _read_ahead(jobs, self.read_ahead):
            plan = job.plan or call_plan
            reference = job.base if job.base is not None else job.models[0]
            ranges = self._part_ranges(reference.numel(), self._bytes_per_element(job, plan), self._row(job, plan))
            stats = job.stats
            if job.stream:
                # The output goes back part by part, each written before the next is downloaded:
                # host memory follows a part, not the tensor (the caller consumes the pieces
                # before asking for the next job).
                if inflight is not None:
                    done = self._finish(inflight)
                    inflight = None
                    if done is not None:
                        yield done
                if any(plan.missing(stats)):
                    stats = self.tensor_stats(job, plan)
                yield job, self._streamed_parts(job, plan, ranges, stats), stats
                continue
            out = torch.empty(reference.shape, dtype=job.out_dtype)
            if any(plan.missing(stats)) and len(ranges) > 1:
                # Statistics need the whole tensor before any merge: finish what is in flight,
                # then statistics passes over the parts (the only case that reads inputs twice).
                if inflight is not None:
                    done = self._finish(inflight)
                    inflight = None
                    if done is not None:
                        yield done
                stats = self.tensor_stats(job, plan)
            table = None
            for k, (start, stop) in enumerate(ranges):
                part = _Part(job, out, start, stop, last=k == len(ranges) - 1)
                self._start(part, plan)
                # While part t uploads and computes, part t-1's output comes back.
                if inflight is not None:
                    done = self._finish(inflight)
                    if done is not None:
                        yield done
                if table is None:
                    if any(plan.missing(stats)):
                        stats = self.tensor_stats(job, plan, part.views)
                    with self._mover.computing():
                        table = plan.table(stats, self._mover.device)
                part.stats = stats or TensorStats()
                self._compute(part, plan, table)
                inflight = part
        if inflight is not None:
            done = self._finish(inflight)
            if done is not None:
                yield done

    def _streamed_parts(self, job: MergeJob, plan, ranges, stats: TensorStats | None) -> Iterator[torch.Tensor]:
        """A streamed job's output, part by part (each a CPU piece of job.out_dtype), with part t+1
        uploading and computing while part t comes back; its inputs are released behind each part."""
        with self._mover.computing():
            table = plan.table(stats, self._mover.device)
        inflight = None
        for k, (start, stop) in enumerate(ranges):
            part = _Part(job, None, start, stop, last=k == len(ranges) - 1, stats=stats or TensorStats(),
                         piece=torch.empty(stop - start, dtype=job.out_dtype))
            self._start(part, plan)
            if job.release is not None:
                job.release(start, stop)   # uploaded: the host pages can go
            if inflight is not None:
                self._finish(inflight)
                yield inflight.piece
            self._compute(part, plan, table)
            inflight = part
        if inflight is not None:
            self._finish(inflight)
            yield inflight.piece

    def _start(self, part: _Part, plan) -> None:
        """Upload stage: the part's inputs into the next slot, with room for its output and flags."""
        job = part.job
        n = part.stop - part.start
        extra = {"out": (job.out_dtype, (n,)), "flags": (torch.int32, (1,))}
        base = self._flat(job.base) if plan.uses_base else None  # a soup never reads the base
        part.slot, part.views = self._upload(base, [self._flat(m) for m in job.models], part.start, part.stop, extra)

    def _compute(self, part: _Part, plan, table) -> None:
        """Compute stage: one kernel launch on the compute stream (asynchronous on a GPU)."""
        from ..rng import tensor_stream_id

        views = part.views
        with self._mover.computing():
            views["flags"].zero_()
            self._merge.launch_merge(
                views["out"], views.get("base"), views["models"], table, plan, n=part.stop - part.start,
                scale=part.job.scale, stream_id=tensor_stream_id(part.job.name), elem_offset=part.start,
                flags=views["flags"] if self.check_finite else None, block=self.block,
                **self._drop_p(part.job, plan, views),
                **self._merge.tensor_args(plan, part.stats, part.job.models[0].shape, self._mover.device))
        self._release(part.slot)

    def _finish(self, part: _Part):
        """Download stage: the part's output into the job's CPU tensor (or its own piece); (job, output)
        after its last part."""
        target = part.piece if part.piece is not None else part.out.view(-1)[part.start:part.stop]
        self._mover.download(target, part.views["out"], part.slot.released)
        if self.check_finite:
            with self._mover.computing():
                bad = int(part.views["flags"].item())
            if bad:
                index = (bad & -bad).bit_length() - 1  # lowest bit first: the base, then model 0, ...
                raise NonFiniteInput(part.job.name, index - 1)
        if part.last:
            return part.job, part.out, part.stats
        return None
