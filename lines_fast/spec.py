"""Resolved, validated merge parameters shared by the reference, the engine and the backends.

`make_spec` is the one validator of a method's parameters: it checks every given value
against the method's registry entry (lines_fast/methods.py), refuses a parameter the method
does not take, fills the defaults, and returns a `MethodSpec` holding one value per
parameter (per-model parameters as one value per model, in config order). `LinesSpec`
holds the LiNeS options. Both are immutable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import methods
from .errors import MergeInputError, listing
from .methods import Consensus, Inputs, Rescale

LINES_OUTSIDE = ("alpha", "last")


def kept_count(density: float, d: int) -> int:
    """k = max(1, floor(density * d)) for d >= 1 (0 for an empty scope), the product in double.

    mergekit keeps at least one element. Every place that turns a density into a count of
    kept elements calls this, so the reference, the backends and the kernels agree on k.
    """
    return max(1, int(math.floor(density * d))) if d >= 1 else 0


def official_kept_count(density: float, d: int) -> int:
    """The official TIES code's k: it keeps |tau| >= the (d - floor(density d))-th smallest, i.e.
    the floor(density d) + 1 largest plus ties (all d where floor(density d) = d)."""
    return min(d, int(math.floor(density * d)) + 1) if d >= 1 else 0


def band_ranks(density: float, gamma: float, d: int) -> tuple[int, int]:
    """breadcrumbs' (k_floor, k_ceiling) for a scope of d elements: drop |tau| >= the k_ceiling-th
    largest (no ceiling when k_ceiling = 0), keep |tau| >= the k_floor-th largest (k_floor = 0
    keeps nothing).

    As mergekit 0.1.5: the top floor(gamma * d) go, then the next floor(density * d) stay (no
    minimum of one here), products in double; density >= 1 leaves the tensor as it is (k_floor
    = d keeps every |tau| >= the smallest, and no ceiling), whatever gamma.
    """
    if density >= 1:
        return d, 0
    top, kept = int(math.floor(gamma * d)), int(math.floor(density * d))
    return (top + kept if kept >= 1 else 0), top


def is_auto(alpha) -> bool:
    """Whether a LiNeS alpha as given (YAML or an option) asks for alpha auto: 'auto' in any case."""
    return isinstance(alpha, str) and alpha.strip().lower() == "auto"


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
    """A merge method with every parameter resolved (build it with make_spec).

    values: (name, value) for each of the method's parameters; a per-model parameter's
    value is a tuple with one entry per model.
    """

    method: str
    n_models: int
    values: tuple[tuple[str, Any], ...]
    lines: LinesSpec | None = None
    with_base: bool = True   # a base is given (Method.without_base decides the inputs otherwise)

    @property
    def definition(self) -> methods.Method:
        return methods.get(self.method)

    def value(self, name: str, default: Any = None) -> Any:
        for key, value in self.values:
            if key == name:
                return value
        return default

    @property
    def weights(self) -> tuple[float, ...]:
        return self.value(self.definition.weight_param, (1.0,) * self.n_models)

    @property
    def densities(self) -> tuple[float, ...]:
        return self.value("density", (1.0,) * self.n_models)

    @property
    def tall(self) -> tuple[int, tuple[float, ...]] | None:
        """Consensus merging's (k, (lambda_i per model)), or None when it is off."""
        value = self.value("consensus")
        if value is None:
            return None
        lam = dict(value)["lambda"]
        return dict(value)["k"], lam if isinstance(lam, tuple) else (lam,) * self.n_models

    @property
    def gammas(self) -> tuple[float, ...]:
        return self.value("gamma", (0.0,) * self.n_models)

    @property
    def lam(self) -> float:
        return self.value("lambda", 1.0)

    @property
    def normalize(self) -> bool:
        return self.value("normalize", False)

    @property
    def trim_scope(self) -> str:
        return self.value("trim_scope", "tensor")

    @property
    def seed(self) -> int:
        return self.value("seed", 0)

    @property
    def rescale(self) -> Rescale:
        value = self.value("rescale", False)
        return {True: Rescale.L1, False: Rescale.NONE, "inverse": Rescale.INVERSE}[value]

    @property
    def inputs(self) -> Inputs:
        """What the method combines in this merge: its registry inputs, or without a base its
        Method.without_base (nuslerp: the models themselves)."""
        definition = self.definition
        return definition.without_base if not self.with_base and definition.without_base else definition.inputs

    @property
    def finetuned_inputs(self) -> int:
        """How many of the inputs are fine-tuned models: N of LiNeS α auto. All but the base
        where it is the method's first input (slerp); linear with an averaged-in base weight
        has the base among its inputs too, which only its config knows (config.models)."""
        return self.n_models - (self.inputs is Inputs.BASE_AND_MODELS)

    @property
    def uses_base(self) -> bool:
        """Whether θ0 is read as θ0: task-vector methods always; a soup (and slerp, whose
        inputs include the base) only as LiNeS's θ0."""
        return self.inputs is Inputs.DELTAS or self.lines is not None

    @property
    def group_by(self) -> str | None:
        """The element groups of the Gram statistic (Method.group_by), or None for given weights."""
        group_by = self.definition.group_by
        return None if group_by is None else group_by(self)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able parameters (for the output's recorded recipe)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values}


def make_spec(method: str, n_models: int, *, model_values: Mapping[str, Any] | None = None,
              values: Mapping[str, Any] | None = None, lines: LinesSpec | None = None,
              where: str = "", model_labels: list[str] | None = None, with_base: bool = True) -> MethodSpec:
    """Validate a method's parameters and fill its defaults.

    values: shared parameters, and per-model ones given once for every model (mergekit's
    top-level `parameters`). model_values: per-model parameters, each a list with one value
    per model (or one value for all). A key the method does not take is an error naming it.
    """
    definition = methods.get(method, where)
    prefix = f"{where}: " if where else ""
    if n_models < definition.min_models or (definition.max_models is not None and n_models > definition.max_models):
        exactly = "exactly " if definition.min_models == definition.max_models else ""
        if definition.inputs is Inputs.BASE_AND_MODELS:
            others = n_models - 1
            raise MergeInputError(f"{prefix}{method} merges {definition.models_text()} model; {others} other "
                                  f"{'model was' if others == 1 else 'models were'} given.")
        noun = "model" if definition.max_models == 1 else "models"
        kind = "" if definition.inputs is Inputs.MODELS else "fine-tuned "   # a soup's inputs are models
        raise MergeInputError(f"{prefix}{method} merges {exactly}{definition.models_text()} {kind}{noun}; "
                              f"{n_models} {'was' if n_models == 1 else 'were'} given.")
    values = dict(values or {})
    model_values = dict(model_values or {})
    labels = model_labels or [f"model {i + 1}" for i in range(n_models)]

    def given_by(name: str) -> str:
        """Who gave a per-model key: the first model that has a value for it."""
        per = model_values.get(name)
        if isinstance(per, (list, tuple)):
            first = next((i for i, v in enumerate(per) if v is not None), 0)
            return f"{labels[first]}: "
        return ""

    # Every problem with the parameters is collected and reported at once, not the first alone.
    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(text[len(prefix):] if prefix and text.startswith(prefix) else text)

    for name in list(values) + list(model_values):
        if not definition.takes(name):
            taken = ", ".join(p.name for p in definition.params) or "none"
            source = given_by(name) if name in model_values else ""
            problem(f"{source}{name} is not a parameter of {method}, so it would be ignored; "
                    f"remove it (the parameters of {method} are: {taken})")
    for name in model_values:
        if definition.takes(name) and not definition.param(name).per_model:
            problem(f"{given_by(name)}{name} is one value for the whole {method} merge, not "
                    "a per-model parameter; give it under the top-level parameters")
    if lines is not None and values.get("lambda") is not None:
        problem(f"lambda {values['lambda']!r} is given with LiNeS, which replaces it (the update "
                "of each block is scaled by alpha + beta * l / (L - 1) instead); remove lambda, or "
                "fold it into alpha and beta")
    resolved: list[tuple[str, Any]] = []
    for p in definition.params:
        try:
            resolved.append((p.name, _resolve(p, values, model_values, n_models, labels, where, method, prefix)))
        except MergeInputError as err:
            problem(str(err).rstrip("."))
    if problems:
        raise listing(prefix, problems, "problems with the parameters")
    spec = MethodSpec(method, n_models, tuple(resolved), lines, with_base)
    _check_divisors(spec, prefix)
    for check in definition.checks:   # each check(spec, prefix, labels) raises for a bad combination
        check(spec, prefix, labels)
    return spec


def _resolve(p, values: dict, model_values: dict, n_models: int, labels: list[str], where: str, method: str,
             prefix: str) -> Any:
    """One parameter's value (per model: a tuple, one per model), checked; MergeInputError if bad."""
    if p.per_model:
        if p.name in values:  # checked even where every model overrides it: refused, never ignored
            for v in (values[p.name] if isinstance(values[p.name], (list, tuple)) else [values[p.name]]):
                p.check(v, f"{where or method}: parameters")
        fallback = values.get(p.name, p.default)
        per = list(fallback) if isinstance(fallback, (list, tuple)) else [fallback] * n_models
        if p.name in model_values:  # None: that model gives no value (the default applies)
            given = model_values[p.name]
            given = list(given) if isinstance(given, (list, tuple)) else [given] * n_models
            if len(given) == len(per):
                per = [f if v is None else v for v, f in zip(given, per)]
            else:
                per = given
        if len(per) != n_models:
            raise MergeInputError(f"{prefix}{len(per)} {p.name} values for {n_models} models; give one, or "
                                  "one per model in order.")
        return tuple(p.check(v, f"{where or method}: {labels[i]}") for i, v in enumerate(per))
    if p.required and values.get(p.name) is None:
        raise MergeInputError(f"{prefix}{method} needs {p.name} ({p.help}; {p.range_text()}); add it under "
                              f"the top-level parameters (on the command line: --param {p.name}=VALUE).")
    return p.check(values.get(p.name, p.default), where or method)


def _check_divisors(spec: MethodSpec, prefix: str) -> None:
    """The normalized means must never divide by zero."""
    definition = spec.definition
    if not spec.normalize:
        return
    weights = list(spec.weights)
    if definition.consensus is Consensus.NONE and float(np.float32(sum(weights))) == 0:  # the divisor is float32
        raise MergeInputError(
            f"{prefix}the weights {weights} sum to 0, and {spec.method} with normalize divides by their sum. "
            "Give weights with a non-zero sum, or set normalize: false (--no-normalize).")
    if definition.consensus is Consensus.SIGN and min(weights) <= 0:
        # The disjoint mean divides by the weights of the agreeing models: with a zero or
        # negative weight that sum can be 0 where models do agree, and the mean is undefined.
        raise MergeInputError(
            f"{prefix}{spec.method} with normalize divides by the sum of the agreeing models' weights, so weights "
            f"must be positive (got {weights}). Drop a model instead of giving it weight 0, or set "
            "normalize: false (--no-normalize) for a weighted sum.")
