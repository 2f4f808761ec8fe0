"""The contract between the engine (planning, I/O) and a backend (per-element math).

The engine hands a backend an ElementPlan (lines_fast/plan.py: what to compute for every
element, derived from the method registry) and whole tensors as read-only CPU tensors
(usually zero-copy views of memory-mapped shards, in their stored dtype: bf16, fp16 or
fp32). The backend executes the plan -- it never reads a method's name -- chunks as it
likes and returns CPU results. A backend must match lines_fast/reference.py within the
tolerances of docs/methods.md, and thresholds, signs and DARE masks exactly. A plan with a
step the backend does not implement is refused by `supports()` before any work, never
approximated.

Magnitude histograms: |tau| of a float32 is non-negative, so its 32-bit pattern read as an
integer sorts exactly as the value does. `magnitude_histogram(..., bucket=None)` counts
those patterns in selection.py's packed 65536-bin layout (the high 16 bits, plus 0x8000
where the low 16 bits are not all 0); with `bucket=b` it counts the low 16 bits of the
elements whose high 16 bits equal b. From these the k-th largest |tau| is exact, usually
from the first alone (see lines_fast/selection.py). NaN never reaches a backend (the
engine refuses it first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

from ..lazy import torch

from ..plan import ElementPlan, TensorStats

HISTOGRAM_BINS = 1 << 16


# Tensors of at least this many elements are merged and written a chunk at a time (MergeJob.stream),
# their input pages released behind each chunk: peak memory then follows the chunk, not the tensor.
STREAM_MIN = 1 << 22


@dataclass
class MergeJob:
    """One output tensor to compute.

    name: the tensor's name (DARE's masks depend on it through rng.tensor_stream_id).
    base: θ0, or None only for a plain soup (ElementPlan.uses_base is False).
    models: the plan's inputs in config order, same shape as base.
    stats: the per-tensor numbers already known (global thresholds from the engine's
        statistics passes, or what an earlier pass returned for this tensor), or None. What
        the plan needs and `stats` lacks (tensor-scope thresholds, L1 rescale factors) the
        backend finds itself, exactly, and returns.
    scale: the factor on the merged task vector: λ, or the LiNeS λ(ℓ) that replaces it.
        Ignored by a plain soup.
    out_dtype: dtype of the result.
    plan: where parameters vary by tensor (mergekit's per-layer lists and filters), the plan of
        this tensor; None: the plan the backend was called with.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    stats: TensorStats | None
    scale: float
    out_dtype: torch.dtype
    plan: ElementPlan | None = None   # this tensor's own plan (per-layer or filtered parameters), else the call's
    # stream: the backend may return the output as an iterator of consecutive flat pieces (each
    # valid until the next is asked for) instead of one tensor, so a huge tensor is never held
    # whole; its stats may then be found while the pieces are produced (merge_many yields None). release(start, end): called once elements start..end of every input have been read
    # for the last time in a pass over them, so their pages can go (the engine unmaps them).
    stream: bool = False
    release: Any = None
    # segments (S, L): the job is S tensors of L elements packed end to end, each with its own
    # tensor-scope thresholds, DARE draws (keyed by its name, in segment_names) and L1 rescale
    # factors (a backend with packs_segments = True takes such jobs).
    segments: tuple[int, int] | None = None
    segment_names: tuple[str, ...] = ()


class Backend(Protocol):
    name: str  # "cpu", "cuda" or "interpret"

    def supports(self, plan: ElementPlan) -> str | None:
        """None when this backend can execute `plan`; else why not (one clause, for the error)."""

    def expect(self, plan: ElementPlan, elements: int) -> None:
        """The merge ahead: `plan` over `elements` elements summed over its inputs (a backend may
        get ready for it)."""

    def magnitude_histograms(self, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        """int64 CPU tensor [N, HISTOGRAM_BINS]: the packed histogram of each model's |tau|, from
        one read of the base (selection's pass 1 for all models at once)."""

    def magnitude_histogram(self, base: torch.Tensor, model: torch.Tensor,
                            bucket: int | None = None) -> torch.Tensor:
        """int64 CPU tensor of HISTOGRAM_BINS counts of |float32(model) - float32(base)| bit patterns
        (packed layout without a bucket; the bucket's low 16 bits with one)."""

    def task_vector_sum_l1(self, base: torch.Tensor, models: list[torch.Tensor]) -> float:
        """sum_j |sum_i tau_i[j]| for this tensor (unweighted, unsparsified)."""

    def tensor_stats(self, job: MergeJob, plan: ElementPlan) -> TensorStats:
        """job.stats completed with everything the plan needs for this tensor."""

    def elected_sign_sum(self, job: MergeJob, plan: ElementPlan) -> int:
        """sum_j sign(sum_i w_i trim(tau_i)[j]) over this tensor (job.stats holds the thresholds):
        the official TIES rule's majority sign, summed by the engine over every merged tensor."""

    def delta_norms(self, job: MergeJob, plan: ElementPlan,
                    with_task_sum: bool = True) -> tuple[float, float, TensorStats]:
        """(task_vector_sum_l1 or 0.0, sum_j |tau_MTL[j]| with λ = 1, the tensor's stats), from one
        read where the backend can: α auto's norms pass needs both norms."""

    def merge_many(self, jobs: Iterable[MergeJob],
                   plan: ElementPlan) -> Iterator[tuple[MergeJob, torch.Tensor, TensorStats]]:
        """Yield (job, output, stats) in job order, output a CPU tensor of job.out_dtype.

        A backend may work ahead (read or compute job t+1 while the caller writes job t),
        but must hold at most a small constant number of jobs at once.
        """
