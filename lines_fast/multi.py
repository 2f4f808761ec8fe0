"""Multi-document configs (mergekit-multi's format): several merges in one YAML file.

    name: math-soup            # a named merge: written to INTERMEDIATE/math-soup
    merge_method: linear
    models: [...]
    ---
    merge_method: ties         # the unnamed (final) merge: written to OUT_DIR
    base_model: base
    models:
      - model: math-soup       # a merge's name stands for its output
      - model: code-ft

As mergekit-multi: every document but at most one has a `name`; a model reference (`model`,
`base_model`, `tokenizer_source`, the tokenizer: block's `source`) equal to a merge's name is that merge's output; merges run
after the ones they use (a cycle is refused). Named merges go to the intermediate directory
(--intermediate-dir, default OUT_DIR-intermediate) and the unnamed one to OUT_DIR; when every
document is named, OUT_DIR is the intermediate directory. Each merge is published atomically by
the engine; with --resume, a merge whose output is already there (written by lines_fast from
the same recipe) is skipped and an interrupted one continues.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import MergeInputError

_REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")   # source: the tokenizer: block


@dataclass
class Step:
    name: str | None
    doc: dict
    out: Path
    needs: set[str]

    @property
    def label(self) -> str:
        return f"merge '{self.name}'" if self.name else "the final (unnamed) merge"


def documents(path: Path) -> list[Any]:
    """The YAML documents of a config file (a one-document list for an ordinary config)."""
    import yaml

    from .config import read_config_text

    text = read_config_text(path)
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise MergeInputError(f"{path}: not valid YAML{where}: {problem}. Fix the file (check the indentation, "
                              "brackets and quotes there).") from None


def _substitute(value: Any, outputs: dict[str, Path], used: set[str]) -> Any:
    """value with every model reference that names a merge replaced by that merge's output."""
    if isinstance(value, list):
        return [_substitute(v, outputs, used) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if key in _REFERENCE_KEYS and isinstance(v, str) and v in outputs:
                used.add(v)
                out[key] = str(outputs[v])
            else:
                out[key] = _substitute(v, outputs, used)
        return out
    return value


def plan(path: Path, docs: list[Any], out: Path, intermediate: Path | None) -> list[Step]:
    """The merges of a multi-document config, in an order where each runs after those it uses."""
    named, unnamed = {}, []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise MergeInputError(f"{path}: document {i + 1} is not a mapping (a merge config).")
        name = doc.get("name")
        if name is None:
            unnamed.append(doc)
            continue
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise MergeInputError(f"{path}: document {i + 1}: name {name!r} must be a plain directory name.")
        if name in named:
            raise MergeInputError(f"{path}: two merges are named {name!r}; names must be unique.")
        named[name] = doc
    if len(unnamed) > 1:
        raise MergeInputError(f"{path}: {len(unnamed)} documents have no name; at most one (the final merge, "
                              "written to OUT_DIR) may be unnamed, as in mergekit-multi.")
    if unnamed:
        where = intermediate or out.with_name(out.name + "-intermediate")
    else:
        where = intermediate or out
    # Absolute: a relative "mout-intermediate/stage1" substituted into a later document would
    # read as a Hugging Face repo id there.
    outputs = {name: Path(os.path.abspath(where / name)) for name in named}
    steps = {}
    for name, doc in [*named.items(), *((None, d) for d in unnamed)]:
        used: set[str] = set()
        patched = _substitute({k: v for k, v in doc.items() if k != "name"}, outputs, used)
        steps[name] = Step(name, patched, outputs[name] if name is not None else out, used)
    ordered: list[Step] = []
    state: dict[str | None, str] = {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*chain[chain.index(name):], name])
            raise MergeInputError(f"{path}: the merges use each other in a cycle ({cycle}); none can run first.")
        state[name] = "visiting"
        for dep in sorted(steps[name].needs):
            visit(dep, chain + [name])
        state[name] = "done"
        ordered.append(steps[name])

    for name in steps:
        visit(name, [])
    return ordered


def run(path: Path, steps: list[Step], *, resume: bool, log: Callable[[str], None], merge_one) -> list:
    """Run the steps in order with merge_one(config_doc, out, source) -> MergeResult; with resume,
    skip those already published from the same recipe."""
    from .config import from_yaml_dict

    # Every document is read before any merge runs: a typo in the last one (a model path, a
    # name no merge has, a parameter) stops the run before the first has spent its time.
    pending = frozenset(step.out for step in steps)
    configs = [from_yaml_dict(step.doc, f"{path} ({step.label})", check_paths=True, pending=pending) for step in steps]
    results = []
    log(f"{path}: {len(steps)} merges: " + ", ".join(f"{s.name or 'final'} -> {s.out}" for s in steps))
    for k, (step, config) in enumerate(zip(steps, configs)):
        if resume and _already_merged(step.out, config):
            log(f"[{k + 1}/{len(steps)}] {step.label}: already merged in {step.out} (same recipe); skipped")
            continue
        log(f"[{k + 1}/{len(steps)}] {step.label} -> {step.out}")
        try:
            results.append(merge_one(config, step.out))
        except MergeInputError as err:
            done = ", ".join(s.name or "final" for s in steps[:k]) or "none"
            raise MergeInputError(f"{err} ({step.label} of {path}, merge {k + 1} of {len(steps)}; finished before "
                                  f"it: {done}; rerun with --resume to skip those)") from None
    return results


def _already_merged(out: Path, config) -> bool:
    """out holds a lines_fast merge of exactly this recipe."""
    from .checkpoint import Checkpoint

    if not out.is_dir():
        return False
    try:
        with Checkpoint.open(out) as ckpt:
            from .checkpoint import read_header
            _, metadata = read_header(ckpt.files[0])
    except MergeInputError:
        return False
    recorded = (metadata or {}).get("lines_fast_recipe")
    return recorded is not None and json.loads(recorded) == json.loads(json.dumps(config.recipe(), sort_keys=True))
