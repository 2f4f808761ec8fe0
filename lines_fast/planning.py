"""How many passes over the inputs a merge needs, and why.

Per-tensor work (tensor-scope TIES, task arithmetic, linear, wise_ft, DARE, LiNeS with a
given α) reads each input byte once: one `merge` pass. Whole-model statistics need passes
before it, and keep only a few numbers per model between passes (2 x 65536 histogram
counts, L1 norms), never tensors:
- `global` trim scope: `magnitudes` (packed high-bit histograms of |τ_i| over all merged
  tensors) then `refine` (low-bit histograms inside the bucket holding each k-th value),
  which the engine skips when the first pass settled every threshold (usual for bf16).
- α `auto`: ‖Σ τ_i‖₁ rides on the first statistics pass; ‖τ_MTL‖₁ needs the final
  thresholds, so it takes a `norms` pass of its own (which also finds tensor-scope
  thresholds, kept for the merge pass).
The engine logs this plan, and `lines-fast plan` prices it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import MethodSpec


@dataclass(frozen=True)
class Pass:
    name: str   # magnitudes | refine | norms | merge
    why: str
    writes: bool = False


def auto_alpha(spec: MethodSpec) -> bool:
    return spec.lines is not None and spec.lines.alpha == "auto"


def plan_passes(spec: MethodSpec) -> list[Pass]:
    passes = []
    global_trim = spec.trims and spec.trim_scope == "global"
    if global_trim:
        why = "histogram |τ_i| over all merged tensors for the global trim thresholds"
        if auto_alpha(spec):
            why += ", and ‖Σ τ_i‖₁ for LiNeS α auto"
        passes.append(Pass("magnitudes", why))
        passes.append(Pass("refine", "resolve each global threshold exactly inside its histogram bucket "
                                    "(skipped when the magnitudes pass settles them)"))
    if auto_alpha(spec):
        why = "‖τ_MTL‖₁ for LiNeS α auto (needs the final thresholds)"
        if not global_trim:
            why = "‖Σ τ_i‖₁ and " + why
            if spec.trims:
                why += "; per-tensor thresholds are kept for the merge pass"
        passes.append(Pass("norms", why))
    what = "merge and write" + (" (per-tensor thresholds found in-pass)" if spec.trims and not global_trim
                                and not auto_alpha(spec) else "")
    passes.append(Pass("merge", what, writes=True))
    return passes


def describe(passes: list[Pass]) -> str:
    count = len(passes)
    lines = [f"{count} pass{'es' if count > 1 else ''} over the inputs:"]
    lines += [f"  {i + 1}. {p.name}: {p.why}" for i, p in enumerate(passes)]
    return "\n".join(lines)
