"""The passes over the inputs a merge makes, derived from its per-element plan.

Per-tensor work (everything the plan needs for one tensor: tensor-scope thresholds, L1
rescale factors, DARE masks, LiNeS with a given α) happens inside the `merge` pass, which
reads each input byte once more only where a per-tensor statistic must see the whole tensor
first. Whole-model statistics need passes before it, each an object that says what it reads
and what it produces, and keeps only a few numbers per model between tensors (65536
histogram counts, exact L1 sums), never tensors:
- global magnitude thresholds: `magnitudes` (packed high-bit histograms of |τ_i| over all
  merged tensors) then `refine` (low-bit histograms inside the bucket holding each k-th
  value), skipped when the first pass settled every threshold (usual for bf16).
- LiNeS α auto: ‖Σ τ_i‖₁ rides on the first statistics pass; ‖τ_MTL‖₁ needs the final
  thresholds, so it takes a `norms` pass of its own (which also returns each tensor's
  statistics, kept for the merge pass).
The engine runs the passes in order and logs this plan; `lines-fast plan` prices it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .lazy import torch

from .backends.base import MergeJob
from .errors import MergeInputError
from .plan import ElementPlan, TensorStats
from .selection import BINS, KEEP_NOTHING, Located, locate_kth
from .spec import MethodSpec


@dataclass
class RunStats:
    """What the statistics passes leave for the merge pass.

    The global thresholds and α are journaled with the output (as exact hex floats), so a
    --resume of the same merge skips the statistics passes; per-tensor statistics are found
    again by the merge pass.
    """

    global_thresholds: tuple[float, ...] | None = None
    tensor_stats: dict[str, TensorStats] = field(default_factory=dict)
    alpha: float | None = None
    task_sum_l1: object = None   # a _TaskSum while a pass adds to it
    located: list[Located | None] = field(default_factory=list)
    majority_sign: float | None = None   # the official TIES rule's sign at a zero election sum
    passes_run: int = 0

    def for_tensor(self, name: str) -> TensorStats | None:
        """What is known of tensor `name`: the global thresholds, and what a pass returned for it."""
        found = self.tensor_stats.get(name)
        if self.global_thresholds is not None:
            return TensorStats(self.global_thresholds, found.factors if found else None,
                               zero_sign=self.majority_sign)
        return found

    def to_json(self) -> dict:
        return {"alpha": None if self.alpha is None else self.alpha.hex(),
                "global_thresholds": None if self.global_thresholds is None
                else [t.hex() for t in self.global_thresholds],
                "majority_sign": self.majority_sign}

    @classmethod
    def from_json(cls, doc: dict) -> "RunStats":
        stats = cls()
        if doc.get("alpha") is not None:
            stats.alpha = float.fromhex(doc["alpha"])
        if doc.get("global_thresholds") is not None:
            stats.global_thresholds = tuple(float.fromhex(t) for t in doc["global_thresholds"])
        if doc.get("majority_sign") is not None:
            stats.majority_sign = float(doc["majority_sign"])
        return stats


@dataclass
class Pass:
    """One pass over every merged tensor. `reads`/`produces` describe it for the log and the
    cost model; a statistics pass implements tensor() and finish()."""

    name: str
    why: str
    produces: str = ""
    writes: bool = False
    with_task_sum: bool = False   # ‖Σ τ_i‖₁ for α auto rides on this pass

    def skip_reason(self, stats: RunStats) -> str | None:
        return None

    def start(self, stats: RunStats, plan: ElementPlan) -> None:
        pass

    def tensor(self, backend, plan: ElementPlan, job: MergeJob, stats: RunStats) -> None:
        pass

    def gather(self, stats: RunStats, world) -> None:
        """Combine what every rank's tensors gave (a distributed merge; one exchange, on every
        rank): integer counts add exactly, L1 norms are pooled for one math.fsum."""

    def finish(self, stats: RunStats, plan: ElementPlan, total_elements: int, log: Callable[[str], None]) -> None:
        pass


class _TaskSum:
    """Sum of per-tensor L1 norms (Python floats), correctly rounded (math.fsum): the total does
    not depend on the order or the grouping of the tensors."""

    def __init__(self) -> None:
        self.parts: list[float] = []

    def add(self, value: float) -> None:
        self.parts.append(value)

    def value(self) -> float:
        return math.fsum(self.parts)


class MagnitudesPass(Pass):
    def start(self, stats, plan):
        self.hists = torch.zeros(plan.n_models, BINS, dtype=torch.int64)
        stats.task_sum_l1 = _TaskSum()

    def tensor(self, backend, plan, job, stats):
        self.hists += backend.magnitude_histograms(job.base, job.models)
        if self.with_task_sum:
            stats.task_sum_l1.add(backend.task_vector_sum_l1(job.base, job.models))

    def gather(self, stats, world):
        parts = world.exchange((self.hists, stats.task_sum_l1.parts))
        self.hists = sum(hists for hists, _ in parts)
        stats.task_sum_l1.parts = [v for _, values in parts for v in values]

    def finish(self, stats, plan, total_elements, log):
        # Global scope is a trim's (one rank per model); k >= 1 for a non-empty model.
        stats.located = [locate_kth(self.hists[i], ranks[0]) if total_elements else None
                         for i, ranks in enumerate(plan.magnitude_ranks(total_elements))]


class RefinePass(Pass):
    def skip_reason(self, stats):
        if all(f is None or f.settled for f in stats.located):
            stats.global_thresholds = _thresholds(stats.located, None)
            return "the magnitudes pass settled every threshold"
        return None

    def start(self, stats, plan):
        self.hists = torch.zeros(plan.n_models, BINS, dtype=torch.int64)

    def tensor(self, backend, plan, job, stats):
        for i, (model, found) in enumerate(zip(job.models, stats.located)):
            if found is not None and not found.settled:
                self.hists[i] += backend.magnitude_histogram(job.base, model, found.bucket)

    def gather(self, stats, world):
        self.hists = sum(world.exchange(self.hists))

    def finish(self, stats, plan, total_elements, log):
        stats.global_thresholds = _thresholds(stats.located, self.hists)


class SignsPass(Pass):
    """The official TIES rule's majority sign: sign(sum over all merged elements of the elected
    sign sign(sum_i trim(tau_i))), +1 where that is 0 too. Integers: exact in any order."""

    def start(self, stats, plan):
        self.total = 0

    def tensor(self, backend, plan, job, stats):
        self.total += backend.elected_sign_sum(job, plan)

    def gather(self, stats, world):
        self.total = sum(world.exchange(self.total))

    def finish(self, stats, plan, total_elements, log):
        stats.majority_sign = -1.0 if self.total < 0 else 1.0
        log(f"official TIES: the elected signs sum to {self.total} over {total_elements} elements, so a zero sign "
            f"sum elects {'+' if stats.majority_sign > 0 else '-'}1")


@dataclass
class NormsPass(Pass):
    finetuned: int = 1   # N of α auto: the fine-tuned models (a base among the inputs is not one)

    def start(self, stats, plan):
        self.delta = _TaskSum()
        if self.with_task_sum:
            stats.task_sum_l1 = _TaskSum()

    def tensor(self, backend, plan, job, stats):
        task_sum, delta, tensor_stats = backend.delta_norms(job, plan, with_task_sum=self.with_task_sum)
        if self.with_task_sum:
            stats.task_sum_l1.add(task_sum)
        self.delta.add(delta)
        stats.tensor_stats[job.name] = tensor_stats

    def gather(self, stats, world):
        parts = world.exchange((self.delta.parts, stats.task_sum_l1.parts if self.with_task_sum else None))
        self.delta.parts = [v for values, _ in parts for v in values]
        if self.with_task_sum:
            stats.task_sum_l1.parts = [v for _, values in parts for v in values]

    def finish(self, stats, plan, total_elements, log):
        sum_l1, delta_l1, n = stats.task_sum_l1.value(), self.delta.value(), self.finetuned
        if delta_l1 == 0.0:
            raise MergeInputError(
                "LiNeS alpha auto is undefined: the merged task vector ‖τ_MTL‖₁ is 0 over all merged "
                "tensors (the models equal the base, or nothing survives trimming). Give alpha explicitly.")
        stats.alpha = (sum_l1 / delta_l1) / n
        log(f"LiNeS alpha auto = (‖Σ τ_i‖₁ / ‖τ_MTL‖₁) / N = ({sum_l1:.6g} / {delta_l1:.6g}) / {n} "
            f"= {stats.alpha:.6g}")


def _thresholds(located: list, low_hists) -> tuple[float, ...]:
    """The global t_i from pass 1's locations and (for unsettled ones) the refine pass's counts."""
    return tuple(KEEP_NOTHING if f is None else f.threshold(None if f.settled else low_hists[i])
                 for i, f in enumerate(located))


def auto_alpha(spec: MethodSpec) -> bool:
    return spec.lines is not None and spec.lines.alpha == "auto"


def plan_passes(spec: MethodSpec, finetuned: int | None = None) -> list[Pass]:
    """The passes of a merge, from its element plan and LiNeS options. finetuned: N of LiNeS α
    auto, the fine-tuned models among the inputs (default spec.finetuned_inputs)."""
    plan = ElementPlan.from_spec(spec)
    alpha = auto_alpha(spec)
    passes: list[Pass] = []
    if plan.global_thresholds:
        why = "histogram |τ_i| over all merged tensors for the global trim thresholds"
        if alpha:
            why += ", and ‖Σ τ_i‖₁ for LiNeS α auto"
        passes.append(MagnitudesPass("magnitudes", why, produces="where each global threshold lies",
                                     with_task_sum=alpha))
        passes.append(RefinePass("refine", "resolve each global threshold exactly inside its histogram bucket "
                                 "(skipped when the magnitudes pass settles them)", produces="global thresholds"))
    if plan.official:
        # Not folded into the norms pass: tau_MTL itself depends on the majority sign where the
        # election sum is 0, so its norm cannot be taken before the sign is known.
        passes.append(SignsPass("signs", "sum the elected signs over all merged tensors for the official rule's "
                                "majority sign (needs the final thresholds)", produces="the majority sign"))
    if alpha:
        why = "‖τ_MTL‖₁ for LiNeS α auto (needs the final thresholds)"
        first = not passes
        if first:
            why = "‖Σ τ_i‖₁ and " + why
            if any(plan.missing(None)):
                why += "; per-tensor statistics are kept for the merge pass"
        passes.append(NormsPass("norms", why, produces="LiNeS α", with_task_sum=first,
                                finetuned=spec.finetuned_inputs if finetuned is None else finetuned))
    in_pass = [what for what, needed in zip(("thresholds", "rescale factors"), plan.missing(None))
               if needed and not (what == "thresholds" and plan.global_thresholds)]
    what = "merge and write" + (f" (per-tensor {' and '.join(in_pass)} found in-pass)" if in_pass and not alpha else "")
    passes.append(Pass("merge", what, produces="the output shards", writes=True))
    return passes


def describe(passes: list[Pass]) -> str:
    count = len(passes)
    lines = [f"{count} pass{'es' if count > 1 else ''} over the inputs:"]
    lines += [f"  {i + 1}. {p.name}: {p.why}" for i, p in enumerate(passes)]
    return "\n".join(lines)
