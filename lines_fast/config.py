"""Merge configuration: mergekit-compatible YAML and CLI options, validated into one MergeConfig.

What both tools share reads exactly as mergekit reads it: merge_method, base_model,
models[].model, models[].parameters (per-model parameters), parameters (the method's own,
and defaults for the per-model ones), dtype, out_dtype, tokenizer_source, the tokenizer: block
and chat_template (lines_fast/vocabulary.py, realign.py, tokenizer_files.py). Which parameters
a method takes, their defaults and ranges come from the method registry
(lines_fast/methods.py) through spec.make_spec, the one validator; a key the method does
not take is refused by name, never ignored. Our additions have keys of their own:
parameters.trim_scope, seed, exclude, and a `lines:` block. Anything mergekit allows that
we do not implement is refused with the reason.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import dtypes, hub, methods, slices as slicing
from .dtypes import DType
from .errors import MergeInputError, listing
from .methods import Inputs
from .settings import check as check_setting, evaluate as evaluate_setting, filters as filters_of, is_setting
from .spec import LINES_OUTSIDE, LinesSpec, MethodSpec, is_auto, make_spec
from .vocabulary import TokenizerSpec, TokenSource

# The output dtypes a config may ask for, by mergekit's names and their short forms.
DTYPES = {
    "float32": dtypes.FLOAT32, "fp32": dtypes.FLOAT32,
    "bfloat16": dtypes.BFLOAT16, "bf16": dtypes.BFLOAT16,
    "float16": dtypes.FLOAT16, "fp16": dtypes.FLOAT16,
}

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "seed", "exclude", "lines", "name"}
# mergekit keys we know and deliberately do not implement: refused with this reason.
_REFUSED_TOP_KEYS = {
    "modules": "per-module configs (modules) are not supported",
}
# mergekit-moe's keys: such a config builds a mixture of experts; said once, and alone.
_MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts")
_MOE = ("this is a mergekit-moe config (it builds a mixture-of-experts model out of dense ones); MoE construction "
        "is out of scope for lines_fast, which merges models of one architecture: use mergekit-moe for it")
_LINES_KEYS = {"alpha", "beta", "gamma", "outside", "layer_pattern"}


@dataclass
class MergeConfig:
    """A merge: which checkpoints, which method, which parameters (validate() checks it and
    resolves `spec`).

    params: the method's parameters as given, by their config names (shared ones, and
    per-model ones meant for every model). model_params: per-model parameters given per
    model, name -> one value per model (None where that model gives none). base_weight:
    linear only, the base averaged in as the first model (mergekit's meaning of base_model
    in a linear YAML that gives a weight for it).
    """

    method: str
    models: list[Path]
    base: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, list] = field(default_factory=dict)
    base_weight: float | None = None
    lines: LinesSpec | None = None
    out_dtype: DType | None = None
    exclude: list[str] = field(default_factory=list)
    # tokenizer_source / the tokenizer: block: the output's vocabulary, every embedding row
    # realigned to it (lines_fast/vocabulary.py); None: the base's tokenizer files, copied.
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None   # as given: auto, a built-in name, or the template
    missing: str = "error"          # or "copy-base": a tensor a model lacks takes the base's value
    allow_nonfinite: bool = False
    source: str = "command line"    # where this config came from, for messages
    notices: list[str] = field(default_factory=list)   # what the merge's log should tell (read, not refused)
    spec: MethodSpec | None = None  # set by validate()
    per_tensor: bool = False        # some parameter is a per-layer list or filtered (set by validate())
    spec_inputs: tuple | None = field(default=None, repr=False)   # make_spec's inputs (validate())
    slices: tuple | None = None     # mergekit's slices: (lines_fast/slices.py); models are then its roles
    # Slices whose parameters differ: per slice (params, model_params) over the top-level ones.
    slice_params: tuple | None = None
    slice_inputs: tuple | None = field(default=None, repr=False)   # spec_inputs per slice (validate())
    # Each model's key in the YAML, for messages, where it is not models[i] (the base was listed).
    model_keys: tuple | None = None

    def method_spec(self) -> MethodSpec:
        return self.spec if self.spec is not None else validate(self).spec

    def spec_for_tensor(self, name: str, t: float, slice_index: int | None = None) -> MethodSpec:
        """The spec of tensor `name` at depth t (layers.depth_fractions) in slice `slice_index`: the
        one spec unless a parameter is a per-layer list or a filtered setting, or slices differ."""
        spec = self.method_spec()
        return _resolved_spec(self, name, t, slice_index) if self.per_tensor else spec

    @property
    def base_is_input(self) -> bool:
        """The base is the first of the method's inputs: averaged in (linear with a base weight), or
        interpolated from (slerp)."""
        return self.base_weight is not None or methods.get(self.method).inputs is Inputs.BASE_AND_MODELS

    @property
    def finetuned_models(self) -> int:
        """N of LiNeS α auto: the models that are not the base (a soup may list its base among
        them; slerp and an averaged-in base take it as an input apart from models)."""
        if self.base is None:
            return len(self.models)
        return sum(1 for m in self.models if not slicing.same_model(m, self.base))

    @property
    def merge_inputs(self) -> list[Path]:
        """The checkpoints the method combines, in order: the base first where it is an input."""
        return ([self.base] if self.base_is_input else []) + list(self.models)

    def recipe(self) -> dict[str, Any]:
        """A JSON-able description of the merge, recorded in the output's metadata."""
        out = {
            "merge_method": self.method,
            "base_model": str(self.base) if self.base else None,
            "models": [str(m) for m in self.models],
            "base_weight": self.base_weight,
            "parameters": self.method_spec().as_dict(),
            "out_dtype": self.out_dtype.name if self.out_dtype else None,
            "exclude": self.exclude,
        }
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.as_dict()
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.slices:
            out["slices"] = [{"base": [str(s.base.path), s.base.start, s.base.end] if s.base else None,
                              "models": [[str(r.path), r.start, r.end] for r in s.models]} for s in self.slices]
        if self.slice_params:
            out["slice_parameters"] = [{"parameters": p, "model_parameters": mp} for p, mp in self.slice_params]
        if self.lines:
            out["lines"] = {"alpha": self.lines.alpha, "beta": self.lines.beta,
                            "outside": self.lines.outside, "layer_pattern": self.lines.layer_pattern}
        return out


def _fail(source: str, message: str) -> MergeInputError:
    return MergeInputError(f"{source}: {message}")


def problems_of(err: MergeInputError, source: str) -> list[str]:
    """The problems an error reports (several where it lists them), without the file's name."""
    listed = getattr(err, "problems", None)
    if listed:
        return list(listed)
    text = str(err)
    return [text[len(source) + 2:].rstrip(".") if text.startswith(f"{source}: ") else text.rstrip(".")]


def refusal(source: str, problems: list[str]) -> MergeInputError:
    """One paragraph for all of a config's problems, numbered when there are several."""
    return listing(f"{source}: ", problems)


def parse_dtype(name: Any, source: str, key: str) -> DType:
    """An output dtype from its name, "torch.bfloat16" (mergekit reads that too) or a torch dtype."""
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise _fail(source, f"{key} '{name}' is not one of bfloat16 (bf16), float16 (fp16), float32 (fp32); "
                            "the math is float32 whatever the inputs are.") from None


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
        if is_auto(alpha):
            alpha = "auto"
        else:
            try:
                alpha = _number(alpha, source, "lines.alpha")
            except MergeInputError as err:
                raise MergeInputError(f"{str(err).rstrip('.')}; or auto (alpha from the task vectors' L1 norms, "
                                      "the paper's rule).") from None
        if "beta" not in block:
            raise _fail(source, "lines: needs beta (the paper tunes it: 0.1-1.5 for ties, 0.1-1.0 for task arithmetic).")
        beta = _number(block["beta"], source, "lines.beta")
    outside = block.get("outside", "alpha")
    if outside not in LINES_OUTSIDE:
        raise _fail(source, f"lines.outside must be 'alpha' or 'last', got {outside!r}.")
    pattern = block.get("layer_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise _fail(source, f"lines.layer_pattern must be a regex (a string with one group around the block "
                            f"index, e.g. '\\.(\\d+)\\.'), got {pattern!r}.")
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
    """A model reference: a local path, or a Hugging Face Hub name (org/name[@revision]) resolved to
    its cached snapshot (lines_fast/hub.py)."""
    if not isinstance(value, (str, Path)):
        raise _fail(source, f"{where} must be a local path or a Hub name (org/name), got {value!r}.")
    if isinstance(value, Path):
        return value.expanduser()
    return hub.resolve(value, f"{source}: {where}")


def _refuse_problems(doc: dict, source: str, base_dir: Path | None, check_paths: bool,
                     pending: frozenset = frozenset()) -> list[str]:
    """The problems a config shows before any parameter is read, all at once: keys lines_fast
    refuses or does not know, the method, and (check_paths) local model paths that do not exist.
    Raised at once where the rest cannot be read (no method, no models, a missing path); keys
    alone are returned, to be listed with the problems found further on."""
    moe = [key for key in _MOE_KEYS if key in doc]
    if moe:   # its other keys (no merge_method, no models) would only add noise
        raise _fail(source, f"'{moe[0]}': {_MOE}.")
    problems = [f"'{key}': {reason}" for key, reason in _REFUSED_TOP_KEYS.items() if key in doc]
    unknown = set(doc) - _TOP_KEYS - set(_REFUSED_TOP_KEYS)
    if unknown:
        problems.append(f"the config: unknown key(s) {', '.join(sorted(unknown))}; lines_fast reads "
                        f"{', '.join(sorted(_TOP_KEYS))}")
    keys_only = len(problems)   # problems that leave the rest of the file readable
    if "merge_method" not in doc:
        problems.append(f"merge_method is missing; one of {', '.join(methods.names())}")
    elif doc["merge_method"] not in methods.REGISTRY:
        problems.append(methods.unknown_method(doc["merge_method"]))
    if doc.get("models") is None and doc.get("slices") is None:
        problems.append("models: is missing; give a list of {model: PATH, parameters: {...}} (or slices:)")
    references = [("base_model", doc.get("base_model"))]
    models = doc.get("models")
    if isinstance(models, list):
        references += [(f"models[{i}].model", m.get("model") if isinstance(m, dict) else m) for i, m in enumerate(models)]
    slices = doc.get("slices")
    if isinstance(slices, list):
        references += [(f"slices[{s}].sources[{j}].model", src.get("model"))
                       for s, sl in enumerate(slices) if isinstance(sl, dict) and isinstance(sl.get("sources"), list)
                       for j, src in enumerate(sl["sources"]) if isinstance(src, dict)]
    if doc.get("tokenizer_source") not in (None, "base", "union"):
        references.append(("tokenizer_source", doc.get("tokenizer_source")))
    block = doc.get("tokenizer")
    if isinstance(block, dict) and block.get("source") not in (None, "base", "union"):
        references.append(("tokenizer.source", block.get("source")))
    for where, value in references if check_paths else ():
        if not isinstance(value, str):
            continue   # refused with its type where it is read
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.exists() or path in pending or ("+" not in value and hub.parse(value) is not None):
            continue   # a Hub name is fetched (or refused) where it is read
        problems.append(f"{where}: {hub.lora_syntax(value)}" if "+" in value else
                        f"{where}: {value} does not exist (a local path, or a Hub name org/name)")
    if len(problems) > keys_only:
        raise refusal(source, problems)
    return problems


def from_yaml_dict(doc: Any, source: str, base_dir: Path | None = None, check_paths: bool = False,
                   pending: frozenset = frozenset()) -> MergeConfig:
    """Read a mergekit-format config document (already parsed from YAML). check_paths: also list
    local model paths that do not exist with the other first problems (a config file's check),
    except those in `pending` (a multi-document config's merges not run yet)."""
    if not isinstance(doc, dict):
        raise _fail(source, "the config must be a YAML mapping with merge_method, base_model and models.")
    key_problems = _refuse_problems(doc, source, base_dir, check_paths, pending)
    try:
        return _read_document(doc, source, base_dir, key_problems)
    except MergeInputError as err:
        if getattr(err, "complete", False) or not key_problems:
            raise
        raise refusal(source, key_problems + problems_of(err, source)) from None


def _read_document(doc: dict, source: str, base_dir: Path | None, key_problems: list[str]) -> MergeConfig:
    """from_yaml_dict past the first checks; its final refusal lists key_problems too."""
    method = methods.get(doc["merge_method"], source)

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() or base_dir is None else (base_dir / p)

    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(source, "parameters: must be a mapping.")
    params = dict(params)
    if "seed" in doc:
        if "seed" in params:
            raise _fail(source, "seed is given twice (top-level seed and parameters.seed); give it once.")
        params["seed"] = doc["seed"]
    base = doc.get("base_model")
    base_path = resolve(_model_path(base, source, "base_model")) if base is not None else None
    parsed, slice_params = None, None
    if doc.get("slices") is not None:
        if doc.get("models") is not None:
            raise _fail(source, "give either models: (whole models) or slices: (layer ranges), not both, as mergekit.")
        parsed = slicing.parse(doc["slices"], base=base_path, base_is_role=method.inputs is not Inputs.MODELS,
                               source=source, resolve=lambda v, where: resolve(_model_path(v, source, where)))
        models, model_params = parsed.models, parsed.model_params
        slice_params = None if parsed.per_slice is None else tuple(
            ({**params, **p}, mp) for p, mp in parsed.per_slice)
        params.update(parsed.params)
        if method.inputs is Inputs.MODELS:
            base_path = None   # a soup's inputs are its sources; mergekit ignores base_model there
    else:
        models, model_params = _models_list(doc.get("models"), source, resolve)
    notices: list[str] = []
    listed = [i for i, m in enumerate(models) if base_path is not None and slicing.same_model(m, base_path)]
    if listed and method.inputs is not Inputs.MODELS:
        # mergekit lists the base among the models freely; it is the base, not a task vector
        # (its parameters, if any, are ignored, as mergekit ignores them).
        model_keys = tuple(f"models[{i}]" for i in range(len(models)) if i not in listed)
        ignored = sorted(k for k, vs in model_params.items() if any(vs[i] is not None for i in listed))
        if ignored:
            entries = " and ".join(f"models[{i}]" for i in listed)
            notices.append(f"{source}: {entries} {'is' if len(listed) == 1 else 'are'} the base model "
                           f"({base_path}); its parameters ({', '.join(ignored)}) have no effect on a {method.name} "
                           "merge (the base has no task vector) and are ignored, as mergekit ignores them.")
        models = [m for i, m in enumerate(models) if i not in listed]
        model_params = {k: [v for i, v in enumerate(vs) if i not in listed] for k, vs in model_params.items()}
        model_params = {k: vs for k, vs in model_params.items() if any(v is not None for v in vs)}
    else:
        model_keys = None
    for param in method.params:   # a parameter given where it changes nothing (the registry says when)
        if param.only_with and param.name in params:
            other = method.param(param.only_with[0])
            note = param.unused_note(params[param.name], params.get(other.name, other.default))
            if note is not None:
                notices.append(f"{source}: {note}")
    base_weight = None
    if base_path is not None and method.inputs is Inputs.MODELS and not listed:
        # mergekit 0.1.5 averages a models: config's base_model in as one more input, with the
        # weight that the top-level parameters give it; without one it stops ("Missing required
        # parameter"). A method of one input has no room for it.
        if method.max_models == 1:
            raise _fail(source, f"{method.name} takes one model, and mergekit would add base_model as a second "
                                "input; remove base_model, or list it as the model.")
        if "weight" not in params:
            raise _fail(source, f"{method.name} with a base_model averages the base in (as mergekit does), so it "
                                "needs a weight for it, and none resolves: add `parameters: {weight: W}` (the "
                                "default weight of every model, the base included), or remove base_model for "
                                "a soup of the listed models only.")
        base_weight = params["weight"]
    # From here on each part is read on its own, and all their problems are reported together.
    problems: list[str] = list(key_problems)

    def attempt(read, default=None):
        try:
            return read()
        except MergeInputError as err:
            problems.extend(problems_of(err, source))
            return default

    def read_chat_template():
        value = doc.get("chat_template")
        if value is not None and not isinstance(value, str):
            raise _fail(source, f"chat_template must be a string (auto, a template's name, or the Jinja template), "
                                f"got {value!r}.")
        return value

    def read_exclude():
        exclude = doc.get("exclude") or []
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            raise _fail(source, f"exclude must be a regex or a list of regexes (strings), got {exclude!r}.")
        return exclude

    # mergekit: the output takes dtype without out_dtype (a bad dtype is then reported once, as dtype)
    out_dtype, out_key = (doc["out_dtype"], "out_dtype") if doc.get("out_dtype") else (doc.get("dtype"), "dtype")
    config = MergeConfig(
        method=method.name,
        models=models,
        base=base_path,
        slices=parsed.slices if parsed is not None else None,
        slice_params=slice_params,
        model_keys=model_keys if parsed is None else None,
        params=params,
        model_params=model_params,
        base_weight=base_weight,
        lines=attempt(lambda: parse_lines(doc["lines"], source) if doc.get("lines") is not None else None),
        out_dtype=attempt(lambda: parse_dtype(out_dtype, source, out_key) if out_dtype else None),
        exclude=list(attempt(read_exclude, [])),
        tokenizer=attempt(lambda: parse_tokenizer(doc, source, resolve)),
        chat_template=attempt(read_chat_template),
        source=source,
        notices=notices,
    )
    config = attempt(lambda: validate(config), config)
    if problems:
        err = refusal(source, problems)
        err.complete = True
        raise err
    return config


def parse_tokenizer(doc: dict, source: str, resolve=lambda p: p) -> TokenizerSpec | None:
    """tokenizer_source or the tokenizer: block (mergekit's TokenizerConfig), as one TokenizerSpec."""
    given, block = doc.get("tokenizer_source"), doc.get("tokenizer")
    if given is not None and block is not None:
        raise _fail(source, "give tokenizer_source or a tokenizer: block, not both (mergekit refuses both too); "
                            "tokenizer: {source: ...} says the same as tokenizer_source.")
    if given is None and block is None:
        return None
    dtype = parse_dtype(doc["dtype"], source, "dtype") if doc.get("dtype") else None

    def source_of(value: Any, where: str) -> str | Path:
        if value in ("union", "base"):
            return value
        if not isinstance(value, (str, Path)):
            raise _fail(source, f"{where} must be union, base or a model path, got {value!r}.")
        return resolve(_model_path(value, source, where))

    if block is None:
        return None if given is None else TokenizerSpec(source_of(given, "tokenizer_source"), dtype=dtype)
    if not isinstance(block, dict):
        raise _fail(source, f"tokenizer: must be a mapping (source, tokens, pad_to_multiple_of), got {block!r}.")
    _refuse_unknown(block, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer", source)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise _fail(source, f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}.")
    tokens_doc = block.get("tokens") or {}
    if not isinstance(tokens_doc, dict):
        raise _fail(source, "tokenizer.tokens must map each token to {source: ..., force: ...}.")
    tokens = []
    for token, entry in tokens_doc.items():
        where = f"tokenizer.tokens[{token!r}]"
        entry = entry or {}
        if not isinstance(entry, dict):
            raise _fail(source, f"{where} must be a mapping with source (a model path, {{kind: zero}} or "
                                "{kind: model_token, model: PATH, token: T | token_id: N}) and force.")
        _refuse_unknown(entry, {"source", "force"}, where, source)
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise _fail(source, f"{where}.force must be true or false, got {force!r}.")
        src = entry.get("source")
        if src is None:
            tokens.append((str(token), TokenSource(force=force)))
        elif isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                _refuse_unknown(src, {"kind"}, f"{where}.source", source)
                tokens.append((str(token), TokenSource("zero", force=force)))
            elif kind == "model_token":
                _refuse_unknown(src, {"kind", "model", "token", "token_id"}, f"{where}.source", source)
                if (src.get("token") is None) == (src.get("token_id") is None):
                    raise _fail(source, f"{where}.source: give exactly one of token and token_id (as mergekit).")
                tid = src.get("token_id")
                if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
                    raise _fail(source, f"{where}.source.token_id must be an integer, got {tid!r}.")
                tokens.append((str(token), TokenSource(
                    "model_token", resolve(_model_path(src.get("model"), source, f"{where}.source.model")),
                    None if src.get("token") is None else str(src["token"]), tid, force)))
            else:
                raise _fail(source, f"{where}.source.kind must be zero or model_token, got {kind!r}.")
        else:
            tokens.append((str(token), TokenSource("model", resolve(_model_path(src, source, f"{where}.source")),
                                                                    force=force)))
    return TokenizerSpec(source_of(block.get("source", "union"), "tokenizer.source"), tuple(tokens), pad, dtype)


def _models_list(models_doc: Any, source: str, resolve) -> tuple[list[Path], dict[str, list]]:
    """A config's `models:` list: the paths, and each per-model parameter as one value per model."""
    if not isinstance(models_doc, list) or not models_doc:
        raise _fail(source, "models: must be a non-empty list of {model: PATH, parameters: {...}} "
                            "(or give slices: with layer ranges).")
    models, model_params = [], {}
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
        for name, value in mparams.items():
            model_params.setdefault(name, [None] * len(models_doc))[i] = value
        models.append(resolve(_model_path(entry["model"], source, f"{where}.model")))
    return models, model_params


def read_config_text(path: Path) -> str:
    """A config file's text, or a MergeInputError saying why it is not a config."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"{path}: the config file does not exist" + (
            " (it is a directory: give the YAML file, or the models with --base/--model)" if path.is_dir() else "")
            + ".")
    raw = path.read_bytes()
    if raw[8:9] == b"{" and int.from_bytes(raw[:8], "little") < len(raw):
        raise MergeInputError(f"{path}: this is a safetensors checkpoint, not a YAML merge config. Give it as a "
                              "model (--model / models: in a config), or pass the config file here.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MergeInputError(f"{path}: not a text file (byte {err.start} is not UTF-8), so not a YAML merge "
                              "config. Pass the config file (mergekit's YAML format).") from None


def load_yaml(path: Path) -> MergeConfig:
    """One merge config from a YAML file (a multi-document file is refused here: `lines-fast merge`
    runs those, lines_fast/multi.py)."""
    from .multi import documents

    path = Path(path)
    docs = documents(path)
    if len(docs) > 1:
        names = [d.get("name") for d in docs if isinstance(d, dict)]
        shown = ", ".join(str(n) if n else "(unnamed)" for n in names)
        raise MergeInputError(f"{path}: a multi-document config ({len(docs)} merges: {shown}), mergekit-multi's "
                              "format. `lines-fast merge CONFIG OUT_DIR` runs them all in order; other commands take "
                              "one merge: put it in a file of its own.")
    # Relative model paths in a config are relative to the working directory, as in mergekit.
    return from_yaml_dict(docs[0] if docs else None, str(path), check_paths=True)


def _resolved_spec(config: MergeConfig, name: str | None, t: float, slice_index: int | None = None) -> MethodSpec:
    """The spec for tensor `name` at depth t (in slice `slice_index` where slices differ): every
    per-tensor setting evaluated there (lines_fast/settings.py); a filter that matches nothing
    leaves the next level to decide. name None: the config's own check, every setting's first entry."""
    inputs = config.slice_inputs[slice_index] if config.slice_inputs and slice_index is not None else config.spec_inputs
    n, model_values, values, labels = inputs
    takes = methods.get(config.method).takes   # a key the method does not take goes through raw: refused

    def at(key, value):
        param = methods.get(config.method).param(key)
        return evaluate_setting(value, name, t) if takes(key) and is_setting(value, param) else value

    here = {k: at(k, v) for k, v in values.items()}
    for key, value in values.items():
        param = methods.get(config.method).param(key)
        if name is not None and param is not None and param.required and here[key] is None:
            raise _fail(config.source, f"tensor {name}: no entry of {key} matches it (its filters are "
                                       f"{', '.join(filters_of(value))}); add an entry without a filter as the "
                                       "default for the other tensors.")
    per_model = {k: [None if v is None else at(k, v) for v in vs] for k, vs in model_values.items()}
    where = f"{config.source}: tensor {name}" if name else config.source
    return make_spec(config.method, n, model_values={k: vs for k, vs in per_model.items() if any(v is not None for v in vs)},
                     values={k: v for k, v in here.items() if v is not None}, lines=config.lines, where=where,
                     model_labels=labels, with_base=config.base is not None)


def _spec_inputs(config: MergeConfig, method, params: dict, model_params: dict, n: int, labels: list[str]):
    """(make_spec's inputs (n, model_values, values, labels), the per-tensor settings among them) for
    one parameter set: the config's, or one slice's."""
    src = config.source
    model_values = {}
    for name, values in model_params.items():
        values = list(values)
        if len(values) == 1 and len(config.models) > 1:
            values = values * len(config.models)
        if len(values) != len(config.models):
            raise _fail(src, f"{len(values)} {name} values for {len(config.models)} models; give one, or one "
                             "per model, in order.")
        if config.base_is_input:
            values = [config.base_weight if name == "weight" else None] + values
        model_values[name] = values
    values = dict(params)
    if config.base_weight is not None and "weight" not in model_values:
        model_values["weight"] = [config.base_weight] + [values.get("weight")] * len(config.models)
    given = [*values.items(), *((k, v) for k, vs in model_values.items() for v in vs)]
    settings = [(k, v) for k, v in given if method.takes(k) and is_setting(v, method.param(k))]
    for key, value in settings:
        check_setting(method.param(key), value, src)
    return (n, model_values, values, labels), settings


def model_key(config: MergeConfig, i: int) -> str:
    """How the user named model i: --model, or its models[j] in the YAML."""
    if config.source == "command line":
        return "--model"
    if config.slices is not None:   # the models are the slices' sources: no models: list to point at
        return f"model {i + 1}"
    return config.model_keys[i] if config.model_keys else f"models[{i}]"


def validate(config: MergeConfig) -> MergeConfig:
    """Check a config and resolve its MethodSpec; raise MergeInputError naming the problem."""
    src = config.source
    method = methods.get(config.method, src)
    if config.out_dtype is not None and not isinstance(config.out_dtype, DType):   # the API takes torch's too
        config = replace(config, out_dtype=parse_dtype(config.out_dtype, src, "out_dtype"))
    if not config.models:
        raise _fail(src, "no fine-tuned models given.")
    if method.base_required and config.base is None:
        raise _fail(src, f"{method.name} needs a base model (base_model / --base): task vectors are "
                         "differences from it.")
    if config.lines is not None and config.base is None:
        raise _fail(src, f"LiNeS on a {method.name} merge needs a base model: it scales the update from the base.")
    if config.base_weight is not None:
        if method.inputs is not Inputs.MODELS:
            raise _fail(src, f"a base weight averages the base in; {method.name} takes task vectors from it instead.")
        if config.base is None:
            raise _fail(src, "a base weight needs a base model.")
    if config.slices is None:
        for j, later in enumerate(config.models):
            first = next(i for i, m in enumerate(config.models) if slicing.same_model(m, later))
            if first < j:
                # mergekit keys a merge's inputs by model, so it would merge this one once.
                named = ((f"model {first + 1} (--model)", f"model {j + 1}") if config.source == "command line"
                         else (model_key(config, first), model_key(config, j)))
                raise _fail(src, f"{named[0]} and {named[1]} are the same model "
                                 f"({later}); list each model once (mergekit would merge it once; to count it more, "
                                 "give it a larger weight).")
    n = len(config.merge_inputs)
    labels = ([f"base_model ({config.base})"] if config.base_is_input else []) + [
        f"{model_key(config, i)} ({path})" for i, path in enumerate(config.models)]
    sets = config.slice_params or ((config.params, config.model_params),)
    per_set = [_spec_inputs(config, method, params, model_params, n, labels) for params, model_params in sets]
    config.per_tensor = any(settings for _, settings in per_set) or len(per_set) > 1
    if config.per_tensor and any(inputs[2].get("trim_scope") == "global" for inputs, _ in per_set):
        raise _fail(src, "per-layer, filtered or per-slice parameters with trim_scope: global are not supported: "
                         "the global thresholds count one density per model over the whole model. Give one density "
                         "per model, or use trim_scope: tensor.")
    config.spec_inputs = per_set[0][0]
    config.slice_inputs = tuple(inputs for inputs, _ in per_set) if config.slice_params else None
    # Validated once with every setting at a probe position (each slice's set); spec_for_tensor
    # resolves each tensor.
    if config.per_tensor:
        config.spec = [_resolved_spec(config, None, 0.0, i) for i in range(len(per_set))][0]
    else:
        config.spec = make_spec(method.name, n, model_values=config.spec_inputs[1], values=config.spec_inputs[2],
                                lines=config.lines, where=src, model_labels=labels, with_base=config.base is not None)
    if config.missing not in ("error", "copy-base"):
        raise _fail(src, f"missing must be 'error' or 'copy-base', got {config.missing!r}.")
    for pattern in config.exclude:
        if not isinstance(pattern, str):
            raise _fail(src, f"exclude pattern {pattern!r} is not a string; give regexes.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise _fail(src, f"exclude pattern {pattern!r} is not a valid regex ({err}).") from None
    return config


# Overrides that set a method parameter (CLI flags, merge(..., lam=...)), by override name.
_PARAM_OVERRIDES = {"lam": "lambda", "lambda": "lambda", "seed": "seed", "trim_scope": "trim_scope",
                    "normalize": "normalize", "rescale": "rescale"}
_MODEL_PARAM_OVERRIDES = {"weights": "weight", "densities": "density"}


def with_overrides(config: MergeConfig, **overrides: Any) -> MergeConfig:
    """Apply CLI/API overrides (None means: not given) and validate again.

    Method parameters (lam, seed, trim_scope, normalize, rescale; weights and densities, one
    value or one per model) replace the config's; any other MergeConfig field is replaced.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    params, model_params = dict(config.params), dict(config.model_params)
    fields = {}
    method = methods.get(config.method, config.source)
    for name, value in (given.pop("params", None) or {}).items():   # --param NAME=VALUE
        param = method.param(name)
        if param is None:
            raise MergeInputError(f"--param {name}: {name} is not a parameter of {method.name}, so it would be "
                                  f"ignored; remove it (the parameters of {method.name} are: "
                                  f"{', '.join(p.name for p in method.params)}).")
        param.check(value, f"--param {name}")
        params[name] = value
        model_params.pop(name, None)   # one value for every model, as the option says
        if name == "weight" and config.base_weight is not None:
            fields["base_weight"] = value   # the top-level weight is the averaged-in base's too (mergekit)
    for key, value in given.items():
        name = _PARAM_OVERRIDES.get(key) or _MODEL_PARAM_OVERRIDES.get(key)
        if name is not None:   # blame the option, not the config's first model
            flag = "--" + name.replace("_", "-")
            param = method.param(name)
            if param is None:
                raise MergeInputError(f"{flag}: {name} is not a parameter of {method.name}, so it would be ignored; "
                                      f"remove it (the parameters of {method.name} are: "
                                      f"{', '.join(p.name for p in method.params)}).")
            for v in value if isinstance(value, (list, tuple)) else [value]:
                param.check(v, flag)
        if key in _PARAM_OVERRIDES:
            params[_PARAM_OVERRIDES[key]] = value
        elif key in _MODEL_PARAM_OVERRIDES:
            model_params[_MODEL_PARAM_OVERRIDES[key]] = list(value) if isinstance(value, (list, tuple)) else [value]
        else:
            fields[key] = value
    if config.slice_params:   # the options apply to every slice's parameter set alike
        missing = object()
        changed = {k: v for k, v in params.items() if config.params.get(k, missing) != v}
        changed_models = {k: v for k, v in model_params.items() if config.model_params.get(k, missing) != v}
        dropped = set(config.model_params) - set(model_params)
        fields["slice_params"] = tuple(
            ({**p, **changed}, {**{k: v for k, v in mp.items() if k not in dropped}, **changed_models})
            for p, mp in config.slice_params)
    return validate(replace(config, params=params, model_params=model_params, spec=None, **fields))
