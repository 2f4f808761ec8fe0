"""Resolved, validated merge parameters shared by the reference, the engine and the backends.

`MethodSpec` is what every backend receives: plain numbers, one entry per fine-tuned model
in config order. `LinesSpec` holds the LiNeS options. Both are immutable so a plan can be
hashed and recorded in the output's metadata.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = ("linear", "wise_ft", "task_arithmetic", "ties", "dare_linear", "dare_ties")
# Methods that trim by magnitude (step 1 of TIES) and so need thresholds.
TRIMMING_METHODS = ("ties",)
# Methods that elect a sign and take the disjoint mean (steps 2-4 of TIES).
SIGN_ELECTING_METHODS = ("ties", "dare_ties")
DROPPING_METHODS = ("dare_linear", "dare_ties")
TRIM_SCOPES = ("tensor", "global")
LINES_OUTSIDE = ("alpha", "last")


def kept_count(density: float, d: int) -> int:
    """k = floor(density * d), computed in double precision exactly as SEMANTICS.md writes it.

    Every place that turns a density into a count of kept elements calls this, so the
    reference, the CPU backend and the kernels can never disagree on k.
    """
    return int(math.floor(density * d))


@dataclass(frozen=True)
class LinesSpec:
    """LiNeS: tensor in block l of a stack of L blocks gets alpha + beta * l / (L - 1).

    alpha is a float, or the string "auto" (resolved by the engine from L1 norms).
    outside: "alpha" (the official code: tensors outside every block get alpha) or "last"
    (they get alpha + beta). layer_pattern: optional user regex with one integer group.
    """

    alpha: float | str = 1.0
    beta: float = 0.0
    outside: str = "alpha"
    layer_pattern: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A merge method with its parameters resolved to one value per model.

    weights/densities have one entry per fine-tuned model (densities are 1.0 for methods
    that do not use them). lam is lambda (wise_ft's mixing coefficient a is lam too).
    """

    method: str
    n_models: int
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    lam: float = 1.0
    normalize: bool = True
    trim_scope: str = "tensor"
    seed: int = 0
    lines: LinesSpec | None = None

    @property
    def trims(self) -> bool:
        return self.method in TRIMMING_METHODS

    @property
    def elects_sign(self) -> bool:
        return self.method in SIGN_ELECTING_METHODS

    @property
    def drops(self) -> bool:
        return self.method in DROPPING_METHODS

    @property
    def uses_base(self) -> bool:
        """linear without LiNeS averages the models themselves; every other form needs θ0."""
        return not (self.method == "linear" and self.lines is None)

    def drop_probabilities(self) -> tuple[float, ...]:
        """DARE's p_i = 1 - density_i."""
        return tuple(1.0 - d for d in self.densities)


def default_lambda(method: str) -> float:
    """λ when the user gives none: 1.0, except wise_ft whose mixing coefficient defaults to 0.5."""
    return 0.5 if method == "wise_ft" else 1.0
