"""The merge methods, each defined once, as data.

A method is a name, the inputs it takes, its parameters, and its composition: what it does
to each model's task vector (the sparsifier), how it combines them (the consensus step), and
whether it works on task vectors or on the models themselves. Everything else is derived
from these entries: config validation and mergekit's defaults (config.py), the CLI's
choices and --help (cli.py), the reference's dispatch (reference.py), the per-element plan
both backends execute (plan.py), the statistics passes and their cost (planning.py,
cost.py), the synthetic configs and benchmarks, the docs table and the test matrix.

Adding a method: one `Method(...)` entry below, and a reference function only if it needs a
step no entry has yet (a new Sparsify or Consensus value, then a kernel switch for it). See
docs/methods.md, "Adding a method".
"""
from __future__ import annotations

import difflib
import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import MergeInputError


FLOAT32_MAX = 3.4028234663852886e38


class Inputs(enum.Enum):
    DELTAS = "task vectors"     # tau_i = theta_i - theta_0; needs a base
    MODELS = "models"           # the models themselves (a soup); a base is optional
    BASE_AND_MODELS = "the base and the models"   # x_0 = theta_0, then the models (slerp); base required


class Sparsify(enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"     # TIES trim: keep |tau_i| >= the k_i-th largest (k_i from density_i)
    RANDOM = "random"           # DARE drop: keep where the Philox draw u >= p_i = 1 - density_i
    BAND = "band"               # breadcrumbs: drop the top gamma_i outliers and keep the density_i below them
    RANKED = "ranked"           # DELLA's MagPrune: keep with a probability that grows with the magnitude's rank in its row


class Consensus(enum.Enum):
    NONE = "none"               # weighted sum (or mean with normalize), from +0.0 as torch.sum
    SIGN = "sign"               # TIES election: sign of the weighted sum, disjoint (weighted) mean
    # The one input's w_0 * x_0 itself, one product and no sum: passthrough, as mergekit's returns
    # the tensor (times its scale), so -0.0 stays -0.0 (a sum from +0.0 would make it +0.0).
    COPY = "copy"


class Coefficients(enum.Enum):
    """Where the per-model weights of the sum come from: the given `weight`s, or per group of
    elements (a tensor, its rows or its columns) from the inputs' norms and dot products (the
    group's Gram matrix), computed before the tensor is merged. The formulas: lines_fast/gram.py."""

    GIVEN = "given"
    SLERP = "slerp"             # spherical interpolation of x_0 and x_1 at t (mergekit's slerp)
    NUSLERP = "nuslerp"         # the same at t = w_1 / (w_0 + w_1), mergekit's nuslerp rules
    MODEL_STOCK = "model_stock"  # t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine; weights t / N


class Rescale(enum.Enum):
    """What happens to the kept values of a sparsified task vector (the `rescale` key)."""

    NONE = "false"              # kept values unchanged
    L1 = "true"                 # mergekit: times ||tau_i||_1 / ||kept tau_i||_1 over the tensor
    INVERSE = "inverse"         # the DARE paper: divided by q_i = float32(1 - p_i)


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    per_model: given per model (`models[].parameters`, with `parameters` as the default for
    all models, as in mergekit) or once for the merge (`parameters`). kind: "number",
    "bool", "choice" or "integer". low/high bound a number (low_open/high_open exclude the
    bound). affects_result False marks a key accepted only for mergekit compatibility.
    """

    name: str
    help: str
    per_model: bool = False
    kind: str = "number"
    default: Any = None
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    affects_result: bool = True
    required: bool = False      # no default: the config must give it (mergekit's slerp `t`)
    fields: tuple = ()          # kind "mapping": its keys, each a Param with its own default
    one_per_model: bool = False  # a mapping's number field: also a list of one number per model
    only_with: tuple = ()       # (parameter, value): this one matters only where that one has that value

    def unused_note(self, given: Any, other: Any) -> str | None:
        """Why `given` (this parameter's value in a config) changes nothing while the parameter
        named by only_with is `other`, or None when it takes effect (or is its default anyway)."""
        plain = (bool, int, float, str)
        if not self.only_with or not isinstance(given, plain) or not isinstance(other, plain):
            return None   # gradients and filters: per tensor, not judged here
        name, wanted = self.only_with
        if other == wanted or given == self.default:
            return None
        return (f"{self.name}: {_show(given)} has no effect while {name} is {_show(other)}; set "
                f"{name}: {_show(wanted)} for it to apply.")

    def with_default(self, default: Any, help: str | None = None, **changes: Any) -> "Param":
        return replace(self, default=default, help=help or self.help, **changes)

    def default_text(self) -> str:
        if self.kind == "mapping" and self.default is None:
            return "off"
        return "required" if self.required else _show(self.default)

    def range_text(self) -> str:
        if self.one_per_model:
            return replace(self, one_per_model=False).range_text() + " (or a list, one per model)"
        if self.kind == "mapping":
            return "{" + ", ".join(f"{f.name}: {f.range_text()}" for f in self.fields) + "}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return " | ".join(_show(c) for c in self.choices)
        if self.kind == "integer":
            return f"an integer in [{_show(self.low)}, {_show(self.high)}]"
        if math.isinf(self.low) and math.isinf(self.high):
            return "any finite number"
        left = "(" if self.low_open or math.isinf(self.low) else "["   # infinities are never accepted
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{_show(self.low)}, {_show(self.high)}{right}"

    def check(self, value: Any, where: str) -> Any:
        """The value, validated and normalized (floats as float; a mapping as sorted (key, value) pairs,
        its fields' defaults filled in; None keeps a mapping off)."""
        if self.kind == "mapping":
            if value is None:
                return None
            if not isinstance(value, dict):
                raise MergeInputError(f"{where}: {self.name} must be a mapping {self.range_text()}, got {value!r}.")
            known = {f.name: f for f in self.fields}
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise MergeInputError(f"{where}: {self.name}: unknown key(s) {', '.join(map(str, unknown))}; it takes "
                                      f"{', '.join(known)} ({self.help}).")
            return tuple((f.name, f.check(value.get(f.name, f.default), f"{where}: {self.name}"))
                         for f in self.fields)
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise MergeInputError(f"{where}: {self.name} must be true or false, got {value!r}.")
        if self.kind == "choice":
            for choice in self.choices:
                if value == choice and type(value) is type(choice):
                    return choice
            raise MergeInputError(f"{where}: {self.name} {value!r} is not supported; it is one of "
                                  f"{self.range_text()} ({self.help}).")
        if self.kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
                raise MergeInputError(f"{where}: {self.name} must be {self.range_text()}, got {value!r}.")
            return value
        if self.one_per_model and isinstance(value, list) and value:   # the length: the method's check
            return tuple(replace(self, one_per_model=False).check(v, where) for v in value)
        if isinstance(value, (list, dict)):
            raise MergeInputError(
                f"{where}: {self.name} is a {type(value).__name__}; give one number here (per-layer lists "
                "and filtered settings go in a YAML config's parameters).")
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-2, without a dot, as a string; mergekit's pydantic
            # turns such strings into numbers, and so do we.
            try:
                value = float(value)
            except ValueError:
                raise MergeInputError(f"{where}: {self.name} must be a number, got the text {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeInputError(f"{where}: {self.name} must be a number, got {value!r}.")
        number = float(value)
        inside = (math.isfinite(number) and abs(number) <= FLOAT32_MAX  # all math is float32
                  and (number > self.low if self.low_open else number >= self.low)
                  and (number < self.high if self.high_open else number <= self.high))
        if not inside:
            if math.isinf(self.low) and math.isinf(self.high):
                raise MergeInputError(f"{where}: {self.name} must be a finite number within float32's range "
                                      f"(the math is float32), got {value!r}.")
            raise MergeInputError(f"{where}: {self.name} {value!r} is outside {self.range_text()} ({self.help}).")
        return number


def _show(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else f"2^{int(math.log2(value + 1))}"
    if isinstance(value, int) and value > 1e15:   # a power of two, or one less (the seed's 2^63 - 1)
        return f"2^{value.bit_length() - 1}" if value & (value - 1) == 0 else f"2^{value.bit_length()} - 1"
    return str(value)


WEIGHT = Param("weight", "the model's weight in the sum", per_model=True, default=1.0)
DENSITY = Param("density", "the fraction of each task vector kept", per_model=True, default=1.0,
                low=0.0, high=1.0, low_open=True)
LAMBDA = Param("lambda", "the scale of the merged task vector", default=1.0)
NORMALIZE = Param("normalize", "divide by the sum of the weights", kind="bool")
INT8_MASK = Param("int8_mask", "mergekit's memory option for its masks; no effect on the result here",
                  kind="bool", default=False, affects_result=False)
RESCALE = Param("rescale", "what happens to the kept values: true (mergekit) matches each tensor's L1 "
                "norm, inverse divides by the keep probability (the DARE paper), false leaves them",
                kind="choice", choices=(True, False, "inverse"))
TRIM_SCOPE = Param("trim_scope", "over what the top-k magnitudes are counted: each tensor (mergekit) or "
                   "the whole model (the TIES paper)", kind="choice", choices=("tensor", "global"),
                   default="tensor")
GAMMA = Param("gamma", "the fraction of largest-magnitude outliers dropped from each task vector",
              per_model=True, default=0.01, low=0.0, high=1.0, high_open=True)
T = Param("t", "the interpolation point: 0 gives the base, 1 the other model", low=0.0, high=1.0, required=True)
FILTER_WISE = Param("filter_wise", "one interpolation ratio per row (per output filter) instead of per tensor",
                    kind="bool", default=False)
NUSLERP_FLATTEN = Param("nuslerp_flatten", "interpolate each tensor as one flat vector (false: per row, or per "
                        "column with nuslerp_row_wise)", kind="bool", default=True)
NUSLERP_ROW_WISE = Param("nuslerp_row_wise", "without flatten: interpolate each column vector (the norms run "
                         "over the first dimension) instead of each row", kind="bool", default=False,
                         only_with=("nuslerp_flatten", False))
TALL = Param("consensus", "consensus (TALL-mask) merging: keep only elements where at least k task vectors "
             "matter, i.e. |tau_i| >= lambda_i * |sum_j tau_j - tau_i|", kind="mapping", default=None,
             fields=(Param("k", "how many task vectors must matter at an element", kind="integer", default=2,
                           low=1, high=1 << 20),
                     Param("lambda", "the TALL mask's threshold ratio: one for all models, or a list of "
                           "one per model (lambda_i, in the order of models:)", default=0.4, low=0.0,
                           one_per_model=True)))
EPSILON = Param("epsilon", "the spread of DELLA's keep probabilities around density (density +- epsilon)",
                per_model=True, default=0.15, low=0.0, high=1.0, high_open=True)
RULE = Param("rule", "mergekit: mergekit's TIES; official: the TIES paper's code (with trim_scope: "
             "global; floor(density d) + 1 kept, the model-wide majority sign where the sign sum is 0)",
             kind="choice", choices=("mergekit", "official"), default="mergekit")
SCALE = Param("scale", "the factor on the tensor (mergekit's passthrough; 1 leaves it as it is)", per_model=True,
              default=1.0)
SEED = Param("seed", "the random seed of the drop masks", kind="integer", default=0, low=0, high=(1 << 63) - 1)


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One merge method as data (see the module docstring)."""

    name: str
    summary: str                        # one line, for --help and the docs table
    formula: str                        # the math, plain text, lambda = 1 part in tau_MTL
    params: tuple[Param, ...]
    inputs: Inputs = Inputs.DELTAS
    sparsify: Sparsify = Sparsify.NONE
    consensus: Consensus = Consensus.NONE
    coefficients: Coefficients = Coefficients.GIVEN
    # Coefficients other than GIVEN: over which groups of a tensor's elements the Gram matrix
    # runs, from the resolved spec: "tensor", "leading" (each index of dim 0), "trailing"
    # (each vector along the last dim) or "columns" (each vector along dim 0). gram.py.
    group_by: Any = None
    min_models: int = 1
    max_models: int | None = None
    paper: str = ""
    mergekit: bool = True               # mergekit has a method of this name and meaning
    # Checks across parameters (one value alone is checked by its Param): each takes the
    # resolved spec, the error prefix and the models' labels, and raises MergeInputError.
    checks: tuple = ()
    # The per-model parameter that is each input's weight in the sum (passthrough calls it scale).
    weight_param: str = "weight"
    # What the inputs are when no base is given, for a method that then works on the models
    # themselves (nuslerp); None: `inputs` always (and a base is required where it needs one).
    without_base: Inputs | None = None
    param_map: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "param_map", {p.name: p for p in self.params})

    @property
    def base_required(self) -> bool:
        return self.inputs in (Inputs.DELTAS, Inputs.BASE_AND_MODELS) and self.without_base is None

    def param(self, name: str) -> Param | None:
        return self.param_map.get(name)

    def model_params(self) -> list[Param]:
        return [p for p in self.params if p.per_model]

    def shared_params(self) -> list[Param]:
        return [p for p in self.params if not p.per_model]

    def takes(self, name: str) -> bool:
        return name in self.param_map

    def models_text(self) -> str:
        if self.inputs is Inputs.BASE_AND_MODELS:   # the base is one of the counted inputs
            others = self.min_models - 1
            return f"the base and {others} other" if self.max_models == self.min_models else \
                f"the base and {others} or more others"
        if self.max_models == self.min_models:
            return f"{self.min_models}"
        return f"{self.min_models} or more" if self.max_models is None else f"{self.min_models} to {self.max_models}"


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    # Every method takes int8_mask, as in mergekit, where Hub configs carry it on slerp and linear
    # merges too: a memory option there, nothing to do here.
    method = replace(method, params=(*method.params, INT8_MASK))
    REGISTRY[method.name] = method
    return method


register(Method(
    "linear", "model soup: weighted average of the models (no task vectors)",
    "theta = sum_i w_i theta_i / sum_i w_i  (without normalize: sum_i w_i theta_i)",
    params=(WEIGHT, NORMALIZE.with_default(True)),
    inputs=Inputs.MODELS, paper="https://arxiv.org/abs/2203.05482"))
register(Method(
    "passthrough", "copy one model's tensors, optionally scaled (with slices: a frankenmerge of layer ranges)",
    "theta = s_1 theta_1",
    params=(SCALE,), inputs=Inputs.MODELS, consensus=Consensus.COPY, min_models=1, max_models=1,
    weight_param="scale"))
register(Method(
    "wise_ft", "WiSE-FT: mix one fine-tune back toward its base",
    "theta = theta_0 + a * tau_1, a = lambda in [0, 1]",
    params=(LAMBDA.with_default(0.5, "the mixing coefficient a (0: the base, 1: the fine-tune)",
                                low=0.0, high=1.0),),
    min_models=1, max_models=1, paper="https://arxiv.org/abs/2109.01903", mergekit=False))
register(Method(
    "task_arithmetic", "task arithmetic: add the weighted task vectors",
    "tau_MTL = sum_i w_i tau_i  (with normalize: / sum_i w_i)",
    params=(WEIGHT, LAMBDA, NORMALIZE.with_default(False), TALL),
    checks=(lambda spec, prefix, labels: _tall_fits_models(spec, prefix),), paper="https://arxiv.org/abs/2212.04089"))
register(Method(
    "ties", "TIES: trim each task vector to its top magnitudes, elect signs, disjoint mean",
    "tau_MTL = sum_{i in A} w_i trim(tau_i) / sum_{i in A} w_i, A agrees with sign(sum_i w_i trim(tau_i))",
    params=(WEIGHT, DENSITY, LAMBDA, NORMALIZE.with_default(True),
            RESCALE.with_default(False, choices=(True, False)), TRIM_SCOPE, RULE, TALL),
    sparsify=Sparsify.MAGNITUDE, consensus=Consensus.SIGN,
    checks=(lambda spec, prefix, labels: _tall_fits_models(spec, prefix),
            lambda spec, prefix, labels: _official_rule(spec, prefix)),
    paper="https://arxiv.org/abs/2306.01708"))
register(Method(
    "dare_linear", "DARE: drop random task-vector elements, rescale, add",
    "tau_MTL = sum_i w_i rescale(drop(tau_i))  (with normalize: / sum_i w_i)",
    params=(WEIGHT, DENSITY, LAMBDA, NORMALIZE.with_default(False), RESCALE.with_default(True), SEED),
    sparsify=Sparsify.RANDOM, paper="https://arxiv.org/abs/2311.03099"))
register(Method(
    "dare_ties", "DARE then TIES's sign election and disjoint merge (no magnitude trim)",
    "tau_MTL = TIES steps 2-3 on rescale(drop(tau_i))",
    params=(WEIGHT, DENSITY, LAMBDA, NORMALIZE.with_default(False), RESCALE.with_default(True), SEED),
    sparsify=Sparsify.RANDOM, consensus=Consensus.SIGN, paper="https://arxiv.org/abs/2311.03099"))


def _tall_fits_models(spec, prefix: str) -> None:
    """A consensus mask needing more task vectors than there are would zero every element; a
    list of lambda_i needs one per model."""
    lam = dict(spec.value("consensus") or {}).get("lambda")
    if isinstance(lam, tuple) and len(lam) != spec.n_models:
        raise MergeInputError(
            f"{prefix}consensus lambda lists {len(lam)} value(s) {list(lam)} for {spec.n_models} model(s): give one "
            "number for all, or one per model in the order of models: (a base listed there has no task vector "
            "and takes none).")
    if spec.tall is not None and spec.tall[0] > spec.n_models:
        raise MergeInputError(
            f"{prefix}consensus k = {spec.tall[0]} needs {spec.tall[0]} task vectors to matter at an element, but "
            f"{spec.n_models} model(s) are merged, so every element would be masked out. Use k <= {spec.n_models}.")


def _official_rule(spec, prefix: str) -> None:
    """The official TIES code has one setting of everything but density and lambda."""
    if spec.value("rule") != "official":
        return
    wrong = []
    if spec.trim_scope != "global":
        wrong.append("trim_scope: global (it trims each task vector over the whole model)")
    if any(w != 1.0 for w in spec.weights):
        wrong.append(f"weight 1 for every model (it has no weights; got {list(spec.weights)})")
    if not spec.normalize:
        wrong.append("normalize: true (it divides by the count of agreeing models)")
    if spec.rescale is not Rescale.NONE:
        wrong.append("rescale: false")
    if wrong:
        raise MergeInputError(f"{prefix}ties with rule: official reproduces the official TIES code, which needs "
                              + "; ".join(wrong) + ". Change those, or use rule: mergekit.")


def _gamma_plus_density(spec, prefix: str, labels: list[str]) -> None:
    """breadcrumbs keeps the density_i of magnitudes below the top gamma_i: both must fit in 1."""
    for i, (gamma, density) in enumerate(zip(spec.value("gamma"), spec.densities)):
        if density < 1 and gamma + density > 1:
            raise MergeInputError(
                f"{prefix}{labels[i]}: gamma {gamma} + density {density} is more than 1, so the outliers dropped "
                f"and the values kept would overlap. Lower gamma or density so that gamma + density <= 1.")


register(Method(
    "breadcrumbs", "Model Breadcrumbs: drop each task vector's largest outliers and its smallest values, add",
    "tau_MTL = sum_i w_i band(tau_i)  (band: below the top gamma_i, the next density_i by magnitude)",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, NORMALIZE.with_default(False),
            RESCALE.with_default(False, choices=(True, False))),
    sparsify=Sparsify.BAND, checks=(_gamma_plus_density,), paper="https://arxiv.org/abs/2312.06795"))
register(Method(
    "breadcrumbs_ties", "Model Breadcrumbs, then TIES's sign election and disjoint merge",
    "tau_MTL = TIES steps 2-3 on band(tau_i)",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, NORMALIZE.with_default(False),
            RESCALE.with_default(False, choices=(True, False))),
    sparsify=Sparsify.BAND, consensus=Consensus.SIGN, checks=(_gamma_plus_density,),
    paper="https://arxiv.org/abs/2312.06795"))


register(Method(
    "slerp", "spherical interpolation of the base and one other model, per tensor",
    "theta = c_0 theta_0 + c_1 theta_1: c = (sin((1-t) a), sin(t a)) / sin a, a = the tensors' angle",
    params=(T,), inputs=Inputs.BASE_AND_MODELS, min_models=2, max_models=2,
    # mergekit-yaml 0.1.5 gives every tensor a leading batch axis before its per-row slerp, so the
    # angle is the whole tensor's (measured: bench/mergekit_semantics.py, 0 elements differ).
    coefficients=Coefficients.SLERP, group_by=lambda spec: "tensor", paper="https://en.wikipedia.org/wiki/Slerp"))
register(Method(
    "nuslerp", "slerp of two models' task vectors (without a base: of the models) at t = w_1 / (w_0 + w_1)",
    "tau_MTL = c_0 tau_0 + c_1 tau_1, c from the angle of tau_0 and tau_1 (per tensor, row or column)",
    params=(WEIGHT, NUSLERP_FLATTEN, NUSLERP_ROW_WISE), inputs=Inputs.DELTAS, without_base=Inputs.MODELS,
    min_models=2, max_models=2,
    coefficients=Coefficients.NUSLERP,
    group_by=lambda spec: ("tensor" if spec.value("nuslerp_flatten") else
                           "columns" if spec.value("nuslerp_row_wise") else "trailing")))
register(Method(
    "model_stock", "Model Stock: move from the base toward the models' average by their pairwise cosine",
    "tau_MTL = t * mean_i tau_i, t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine (0 if singular)",
    params=(FILTER_WISE,), min_models=2, coefficients=Coefficients.MODEL_STOCK,
    group_by=lambda spec: "trailing" if spec.value("filter_wise") else "tensor",
    paper="https://arxiv.org/abs/2403.19522"))


def _della_epsilon(spec, prefix: str, labels: list[str]) -> None:
    """DELLA's keep probabilities run from density - epsilon to density + epsilon: inside (0, 1)."""
    for i, (epsilon, density) in enumerate(zip(spec.value("epsilon"), spec.densities)):
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise MergeInputError(
                f"{prefix}{labels[i]}: density {density} +- epsilon {epsilon} leaves (0, 1), so some keep "
                "probabilities would not be probabilities (mergekit refuses this too). Choose epsilon < "
                f"min(density, 1 - density) = {min(density, 1 - density):.6g}.")


for _name, _consensus, _normalize, _summary in (
        ("della", Consensus.SIGN, True, "DELLA: drop by magnitude rank per row (MagPrune), rescale, elect signs, "
                                        "disjoint mean"),
        ("della_linear", Consensus.NONE, False, "DELLA's MagPrune drop per row, rescale, add")):
    register(Method(
        _name, _summary,
        "keep tau_i[r, j] with probability density_i - epsilon_i + 2 epsilon_i rank / max rank in row r, then "
        + ("TIES steps 2-3" if _consensus is Consensus.SIGN else "sum_i w_i"),
        params=(WEIGHT, DENSITY, EPSILON, LAMBDA, NORMALIZE.with_default(_normalize),
                RESCALE.with_default(True, choices=(True, False)), SEED),
        sparsify=Sparsify.RANKED, consensus=_consensus, checks=(_della_epsilon,),
        paper="https://arxiv.org/abs/2406.11617"))


def names() -> list[str]:
    return list(REGISTRY)


def get(name: Any, where: str = "") -> Method:
    """The registered method called `name`, or a MergeInputError listing them."""
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        prefix = f"{where}: " if where else ""
        raise MergeInputError(f"{prefix}{unknown_method(name)}.")
    return method


def unknown_method(name: Any) -> str:
    """The problem with a merge_method that is not registered: the nearest name, and every name."""
    near = difflib.get_close_matches(name.lower(), list(REGISTRY), n=1, cutoff=0.6) if isinstance(name, str) else []
    hint = f" (did you mean {near[0]}?)" if near else ""
    return (f"unknown merge method {name!r}{hint}; lines_fast has {', '.join(REGISTRY)} (mergekit's other methods "
            "are not implemented yet)")


def takers(param: str) -> str:
    """The methods that take `param`, for option help: 'ties, dare_linear, ...'."""
    return ", ".join(m.name for m in REGISTRY.values() if m.takes(param))


def defaults_text(param: str) -> str:
    """`param`'s default in each method that takes it, for option help: 'true for linear, ties;
    false for task_arithmetic, ...'."""
    by_default: dict[str, list[str]] = {}
    for m in REGISTRY.values():
        if m.takes(param):
            by_default.setdefault(m.param(param).default_text(), []).append(m.name)
    return "; ".join(f"{default} for {', '.join(names)}" for default, names in by_default.items())


def help_text() -> str:
    """The methods and their parameters, for `lines-fast merge --help` (generated from the registry)."""
    lines = ["methods (parameters; defaults):"]
    for m in REGISTRY.values():
        params = ", ".join(f"{p.name}={p.default_text()}" for p in m.params if p.affects_result)
        lines.append(f"  {m.name:<16} {m.summary}")
        lines.append(f"  {'':<16}   {params}")
    return "\n".join(lines)


def parameters_table() -> str:
    """docs/methods.md's parameter table: every parameter, its scope, its range and which methods
    take it with what default (tests/test_methods.py checks the docs hold exactly this)."""
    def grouped(pairs: list[tuple[str, str]]) -> str:   # (text, method) -> "text (`m`, `n`); ..."
        by_text: dict[str, list[str]] = {}
        for text, method in pairs:
            by_text.setdefault(text, []).append(f"`{method}`")
        if len(by_text) == 1 and len(pairs) == len(REGISTRY):
            return f"{next(iter(by_text))}, every method"
        return "; ".join(f"{text} ({', '.join(ms)})" for text, ms in by_text.items())

    rows = ["| parameter | scope | range | default |", "|---|---|---|---|"]
    uses: dict[str, list[tuple[Param, str]]] = {}
    for m in REGISTRY.values():
        for p in m.params:
            uses.setdefault(p.name, []).append((p, m.name))
    for name, taken in uses.items():
        ranges = [(p.range_text().replace(" | ", " / "), m) for p, m in taken]   # "|" would split the cell
        if len({r for r, _ in ranges}) == 1:
            range_cell = ranges[0][0]
        else:
            range_cell = grouped(ranges)
        scope = "per model" if taken[0][0].per_model else "shared"
        rows.append(f"| `{name}` | {scope} | {range_cell} | {grouped([(p.default_text(), m) for p, m in taken])} |")
    return "\n".join(rows)


def markdown_table() -> str:
    """The README's method table (tests/test_methods_docs.py checks the README holds exactly this)."""
    rows = ["| method | what it computes | parameters (default) | inputs |", "|---|---|---|---|"]
    for m in REGISTRY.values():
        params = ", ".join(f"`{p.name}`" + ("ᵢ" if p.per_model else "") + f" ({p.default_text()})"
                           for p in m.params if p.affects_result)
        inputs = (f"the base and {m.min_models - 1} other model" if m.inputs is Inputs.BASE_AND_MODELS else
                  f"base {'required' if m.base_required else 'optional'}; {m.models_text()} fine-tuned")
        rows.append(f"| `{m.name}` | {m.summary}: `{m.formula}` | {params} | {inputs} |")
    return "\n".join(rows)
