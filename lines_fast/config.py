"""Merge configuration: mergekit-compatible YAML and CLI options, validated into one MergeConfig.

What both tools share reads exactly as mergekit reads it: merge_method, base_model,
models[].model, models[].parameters.weight/density, parameters.lambda/normalize, dtype,
out_dtype, tokenizer_source. Our additions have keys of their own: parameters.trim_scope,
seed, exclude, and a `lines:` block. Anything mergekit allows that we do not implement is
refused by name, never ignored.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import MergeInputError
from .spec import LINES_OUTSIDE, METHODS, TRIM_SCOPES, LinesSpec, MethodSpec, default_lambda
from .rng import MAX_SEED

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "seed", "exclude", "lines", "name"}
# mergekit keys we know and deliberately do not implement: refused with this reason.
_REFUSED_TOP_KEYS = {
    "slices": "layer slicing (slices) is not supported; merge whole models",
    "modules": "per-module configs (modules) are not supported",
    "tokenizer": "the tokenizer: block (vocabulary union / embedding surgery) is not supported; use tokenizer_source: base or a model path",
    "chat_template": "chat_template is not supported; edit the copied tokenizer_config.json",
}
_METHOD_PARAMS = {"lambda", "normalize", "trim_scope", "int8_mask", "rescale", "weight", "density"}
_MODEL_PARAMS = {"weight", "density"}
_LINES_KEYS = {"alpha", "beta", "gamma", "outside", "layer_pattern"}


@dataclass
class MergeConfig:
    """A validated merge: which checkpoints, which method, which parameters."""

    method: str
    models: list[Path]
    base: Path | None = None
    weights: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    lam: float | None = None
    normalize: bool = True
    trim_scope: str = "tensor"
    seed: int = 0
    lines: LinesSpec | None = None
    out_dtype: torch.dtype | None = None
    exclude: list[str] = field(default_factory=list)
    tokenizer_source: Path | None = None
    missing: str = "error"          # or "copy-base": a tensor a model lacks takes the base's value
    allow_nonfinite: bool = False
    source: str = "command line"    # where this config came from, for messages

    def method_spec(self) -> MethodSpec:
        return MethodSpec(
            method=self.method, n_models=len(self.models), weights=tuple(self.weights),
            densities=tuple(self.densities), lam=self.effective_lambda, normalize=self.normalize,
            trim_scope=self.trim_scope, seed=self.seed, lines=self.lines)

    @property
    def effective_lambda(self) -> float:
        return default_lambda(self.method) if self.lam is None else self.lam

    def recipe(self) -> dict[str, Any]:
        """A JSON-able description of the merge, recorded in the output's metadata."""
        out = {
            "merge_method": self.method,
            "base_model": str(self.base) if self.base else None,
            "models": [{"model": str(m), "weight": w, "density": d}
                       for m, w, d in zip(self.models, self.weights, self.densities)],
            "lambda": self.effective_lambda, "normalize": self.normalize,
            "trim_scope": self.trim_scope, "seed": self.seed,
            "out_dtype": DTYPE_NAMES.get(self.out_dtype) if self.out_dtype else None,
            "exclude": self.exclude,
        }
        if self.lines:
            out["lines"] = {"alpha": self.lines.alpha, "beta": self.lines.beta,
                            "outside": self.lines.outside, "layer_pattern": self.lines.layer_pattern}
        return out


def _fail(source: str, message: str) -> MergeInputError:
    return MergeInputError(f"{source}: {message}")


def parse_dtype(name: Any, source: str, key: str) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPE_NAMES:
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise _fail(source, f"{key} '{name}' is not one of bfloat16, float16, float32.") from None


def _number(value: Any, source: str, what: str) -> float:
    if isinstance(value, (list, dict)):
        raise _fail(source, f"{what} is a {type(value).__name__}; mergekit's per-layer gradients "
                            "and filtered parameters are not supported, give one number.")
    if isinstance(value, bool):
        raise _fail(source, f"{what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(source, f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise _fail(source, f"{what} must be finite, got {value!r}.")
    return number


def _bool(value: Any, source: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _fail(source, f"{what} must be true or false, got {value!r}.")


def parse_lines(block: Any, source: str) -> LinesSpec:
    """A `lines:` block: {alpha: float|auto, beta, outside, layer_pattern} or {gamma} (single-model form)."""
    if not isinstance(block, dict):
        raise _fail(source, "lines: must be a mapping with alpha/beta (or gamma), outside, layer_pattern.")
    _refuse_unknown(block, _LINES_KEYS, "lines", source)
    if "gamma" in block:
        if "alpha" in block or "beta" in block:
            raise _fail(source, "lines: give either gamma (alpha = gamma, beta = 1 - gamma) or alpha/beta, not both.")
        gamma = _number(block["gamma"], source, "lines.gamma")
        alpha, beta = gamma, 1.0 - gamma
    else:
        alpha = block.get("alpha", "auto")
        if not (isinstance(alpha, str) and alpha == "auto"):
            alpha = _number(alpha, source, "lines.alpha")
        if "beta" not in block:
            raise _fail(source, "lines: needs beta (the paper tunes it: 0.1-1.5 for ties, 0.1-1.0 for task arithmetic).")
        beta = _number(block["beta"], source, "lines.beta")
    outside = block.get("outside", "alpha")
    if outside not in LINES_OUTSIDE:
        raise _fail(source, f"lines.outside must be 'alpha' or 'last', got {outside!r}.")
    pattern = block.get("layer_pattern")
    if pattern is not None:
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise _fail(source, f"lines.layer_pattern {pattern!r} is not a valid regex ({err}).") from None
        if compiled.groups != 1:
            raise _fail(source, f"lines.layer_pattern {pattern!r} must have exactly one group capturing "
                                f"the block index, it has {compiled.groups}.")
    return LinesSpec(alpha=alpha, beta=beta, outside=outside, layer_pattern=pattern)


def _refuse_unknown(block: dict, known, where: str, source: str) -> None:
    """Refuse keys lines_fast does not read, naming them and the ones it does."""
    unknown = set(block) - set(known)
    if unknown:
        raise _fail(source, f"{where}: unknown key(s) {', '.join(sorted(unknown))}; lines_fast reads "
                            f"{', '.join(sorted(known))}.")


def _model_path(value: Any, source: str, where: str) -> Path:
    if not isinstance(value, (str, Path)):
        raise _fail(source, f"{where} must be a local path, got {value!r}.")
    return Path(value).expanduser()


def from_yaml_dict(doc: Any, source: str, base_dir: Path | None = None) -> MergeConfig:
    """Read a mergekit-format config document (already parsed from YAML)."""
    if not isinstance(doc, dict):
        raise _fail(source, "the config must be a YAML mapping with merge_method, base_model and models.")
    for key, reason in _REFUSED_TOP_KEYS.items():
        if key in doc:
            raise _fail(source, f"'{key}': {reason}.")
    _refuse_unknown(doc, _TOP_KEYS, "the config", source)
    if "merge_method" not in doc:
        raise _fail(source, f"merge_method is missing; one of {', '.join(METHODS)}.")

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() or base_dir is None else (base_dir / p)

    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(source, "parameters: must be a mapping.")
    _refuse_unknown(params, _METHOD_PARAMS, "parameters", source)
    for key in ("weight", "density"):
        if key in params:  # checked even where every model overrides it: refused, never ignored
            _number(params[key], source, f"parameters.{key}")
    if params.get("rescale", True) is not True:
        raise _fail(source, "parameters.rescale: false is not supported; DARE always rescales kept "
                            "values by 1/(1-p) (see README, differences from mergekit).")
    models_doc = doc.get("models")
    if not isinstance(models_doc, list) or not models_doc:
        raise _fail(source, "models: must be a non-empty list of {model: PATH, parameters: {...}}.")
    models, weights, densities = [], [], []
    for i, entry in enumerate(models_doc):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise _fail(source, f"{where} must be a mapping with a 'model' path.")
        _refuse_unknown(entry, {"model", "parameters"}, where, source)
        mparams = entry.get("parameters") or {}
        if not isinstance(mparams, dict):
            raise _fail(source, f"{where}.parameters must be a mapping.")
        _refuse_unknown(mparams, _MODEL_PARAMS, f"{where}.parameters", source)
        models.append(resolve(_model_path(entry["model"], source, f"{where}.model")))
        weights.append(_number(mparams.get("weight", params.get("weight", 1.0)), source, f"{where} weight"))
        densities.append(_number(mparams.get("density", params.get("density", 1.0)), source, f"{where} density"))
    base = doc.get("base_model")
    out_dtype = doc.get("out_dtype") or doc.get("dtype")  # mergekit: the output takes dtype without out_dtype
    tokenizer_source = doc.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise _fail(source, "tokenizer_source must be 'base' or a model path ('union' is not supported).")
    if tokenizer_source == "union":
        raise _fail(source, "tokenizer_source: union is not supported; use base or a model path.")
    exclude = doc.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    config = MergeConfig(
        method=str(doc["merge_method"]),
        models=models,
        base=resolve(_model_path(base, source, "base_model")) if base is not None else None,
        weights=weights,
        densities=densities,
        lam=_number(params["lambda"], source, "parameters.lambda") if "lambda" in params else None,
        normalize=_bool(params["normalize"], source, "parameters.normalize") if "normalize" in params else None,
        trim_scope=params.get("trim_scope", "tensor"),
        seed=doc.get("seed", 0),
        lines=parse_lines(doc["lines"], source) if doc.get("lines") is not None else None,
        out_dtype=parse_dtype(out_dtype, source, "out_dtype") if out_dtype else None,
        exclude=list(exclude),
        tokenizer_source=(None if tokenizer_source in (None, "base")
                          else resolve(_model_path(tokenizer_source, source, "tokenizer_source"))),
        source=source,
    )
    return validate(config)


def load_yaml(path: Path) -> MergeConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"{path}: the config file does not exist.")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        # One line, not PyYAML's multi-line excerpt: where, and what the parser expected.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise MergeInputError(f"{path}: not valid YAML{where}: {problem}. Fix the file (check the "
                              "indentation, brackets and quotes there).") from None
    # Relative model paths in a config are relative to the working directory, as in mergekit.
    return from_yaml_dict(doc, str(path))


def validate(config: MergeConfig) -> MergeConfig:
    """Check a config and fill defaults; raise MergeInputError naming the problem."""
    src = config.source
    if config.method not in METHODS:
        raise _fail(src, f"unknown merge method '{config.method}'; lines_fast has {', '.join(METHODS)} "
                         "(mergekit's other methods are not implemented).")
    n = len(config.models)
    if n == 0:
        raise _fail(src, "no fine-tuned models given.")
    if not config.weights:
        config.weights = [1.0] * n
    if not config.densities:
        config.densities = [1.0] * n
    if len(config.weights) == 1 and n > 1:
        config.weights = config.weights * n
    if len(config.densities) == 1 and n > 1:
        config.densities = config.densities * n
    if len(config.weights) != n:
        raise _fail(src, f"{len(config.weights)} weights for {n} models; give one weight per model, in order.")
    if len(config.densities) != n:
        raise _fail(src, f"{len(config.densities)} densities for {n} models; give one density, or one per model.")
    for path, density in zip(config.models, config.densities):
        if not 0.0 < density <= 1.0:
            raise _fail(src, f"density {density} for model {path} is outside (0, 1]; it is the fraction of "
                             "each task vector kept (0.2 keeps the largest 20%).")
    if config.normalize is None:
        # mergekit's defaults: linear and ties normalize; task arithmetic does not.
        config.normalize = config.method in ("linear", "ties", "dare_ties")
    if config.method in ("task_arithmetic", "dare_linear", "wise_ft") and config.normalize:
        raise _fail(src, f"normalize: true is not defined for {config.method} (θ = θ0 + λ·Σ w_i τ_i); "
                         "set weights that sum to what you want, or use linear.")
    divides_by_weight_sum = (config.method == "linear" and config.normalize)
    if divides_by_weight_sum and abs(sum(config.weights)) == 0.0:
        raise _fail(src, f"the weights {config.weights} sum to zero, and {config.method} divides by their sum. "
                         "Give weights with a non-zero sum, or set normalize: false (--no-normalize) "
                         "for θ = Σ w_i θ_i.")
    if config.method in ("ties", "dare_ties") and config.normalize and min(config.weights) <= 0.0:
        # The disjoint mean divides by the weights of the agreeing models: with a zero or
        # negative weight that sum can be 0 where models do agree, and the mean is undefined.
        raise _fail(src, f"{config.method} with normalize divides by the sum of the agreeing models' weights, "
                         f"so weights must be positive (got {config.weights}). Drop a model instead of giving "
                         "it weight 0, or set normalize: false (--no-normalize) for a weighted sum.")
    if config.method != "linear" and config.base is None:
        raise _fail(src, f"{config.method} needs a base model (base_model / --base): task vectors are "
                         "differences from it.")
    if config.method == "linear" and config.lines is not None and config.base is None:
        raise _fail(src, "LiNeS on a linear merge needs a base model: it scales the update from the base.")
    if config.method == "wise_ft":
        if n != 1:
            raise _fail(src, f"wise_ft mixes one fine-tuned model with its base; {n} models were given.")
        a = config.effective_lambda
        if not 0.0 <= a <= 1.0:
            raise _fail(src, f"wise_ft's mixing coefficient (lambda) must be in [0, 1], got {a}.")
    if config.trim_scope not in TRIM_SCOPES:
        raise _fail(src, f"trim_scope '{config.trim_scope}' is not 'tensor' or 'global'.")
    if config.trim_scope == "global" and config.method != "ties":
        raise _fail(src, f"trim_scope: global applies to ties only ({config.method} does not trim by magnitude).")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        raise _fail(src, f"seed must be an integer in [0, 2^63), got {config.seed!r}.")
    if config.missing not in ("error", "copy-base"):
        raise _fail(src, f"missing must be 'error' or 'copy-base', got {config.missing!r}.")
    for pattern in config.exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise _fail(src, f"exclude pattern {pattern!r} is not a valid regex ({err}).") from None
    return config


def with_overrides(config: MergeConfig, **overrides: Any) -> MergeConfig:
    """Apply CLI/API overrides (None means: not given) and validate again."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return validate(replace(config, **given))
