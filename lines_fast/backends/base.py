"""The contract between the engine (planning, I/O) and a backend (per-element math).

The engine hands a backend whole tensors as read-only CPU tensors (usually zero-copy views
of memory-mapped shards, in their stored dtype: bf16, fp16 or fp32). The backend forms
task vectors in float32 (tau_i = float32(model_i) - float32(base)), chunks as it likes and
returns CPU results. All semantics are those of ../shared/SEMANTICS.md and
lines_fast/reference.py; a backend must match the reference within its tolerances, and
thresholds, signs and DARE masks exactly.

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
from typing import Iterable, Iterator, Protocol

import torch

from ..spec import MethodSpec

HISTOGRAM_BINS = 1 << 16


@dataclass
class MergeJob:
    """One output tensor to compute.

    name: the tensor's name (DARE's masks depend on it through rng.tensor_stream_id).
    base: θ0, or None only for plain `linear` (MethodSpec.uses_base is False).
    models: θ_1..θ_N in config order, same shape as base.
    thresholds: for trimming methods, t_i per model as a float32-representable float
        (keep |tau_i| >= t_i); float('inf') keeps nothing (k = 0). For a trimming method
        with `tensor` scope it may be None: the backend then finds the per-tensor
        thresholds itself (k_i = spec.kept_count(density_i, numel), exact, via
        selection.tensor_thresholds or its own fused equivalent), so a GPU can select and
        merge from one host-to-device copy. None for methods that do not trim.
    scale: the factor on the merged task vector: λ, or the LiNeS λ(ℓ) that replaces it.
        Ignored by plain `linear`.
    out_dtype: dtype of the result.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    thresholds: tuple[float, ...] | None
    scale: float
    out_dtype: torch.dtype


class Backend(Protocol):
    name: str  # "cpu", "cuda" or "interpret"

    def magnitude_histograms(self, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        """int64 CPU tensor [N, HISTOGRAM_BINS]: the packed histogram of each model's |tau|, from
        one read of the base (selection's pass 1 for all models at once)."""

    def magnitude_histogram(self, base: torch.Tensor, model: torch.Tensor,
                            bucket: int | None = None) -> torch.Tensor:
        """int64 CPU tensor of HISTOGRAM_BINS counts of |float32(model) - float32(base)| bit patterns
        (packed layout without a bucket; the bucket's low 16 bits with one)."""

    def task_vector_sum_l1(self, base: torch.Tensor, models: list[torch.Tensor]) -> float:
        """sum_j |sum_i tau_i[j]| for this tensor (unweighted, untrimmed), accumulated in float64."""

    def merged_delta_l1(self, job: MergeJob, spec: MethodSpec) -> float:
        """sum_j |tau_MTL[j]| for this tensor: the merged task vector with λ = 1, no LiNeS scale."""

    def delta_norms(self, job: MergeJob, spec: MethodSpec) -> tuple[float, float]:
        """(task_vector_sum_l1, merged_delta_l1) of this tensor, equal to the two calls', from one
        read where the backend can: α auto's norms pass needs both."""

    def merge_many(self, jobs: Iterable[MergeJob], spec: MethodSpec) -> Iterator[tuple[MergeJob, torch.Tensor]]:
        """Yield (job, output) in job order, output a CPU tensor of job.out_dtype.

        A backend may work ahead (read or compute job t+1 while the caller writes job t),
        but must hold at most a small constant number of jobs at once.
        """
