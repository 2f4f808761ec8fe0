"""mergekit's `slices:`: an output model assembled from layer ranges of the inputs.

    slices:
      - sources:
          - {model: A, layer_range: [0, 16]}
          - {model: B, layer_range: [0, 16]}
      - sources:
          - {model: A, layer_range: [8, 24]}
          - {model: B, layer_range: [8, 24]}

Output layer k of slice s is layer `start + offset` of each source, renumbered so the
output's layers run 0..K-1 (K the sum of the slices' lengths). Every slice combines its
sources with the config's method, as mergekit does; with `passthrough` and one source per
slice this is a frankenmerge. Tensors outside the layers come from the first slice's
sources (embeddings) or the last slice's (final norm, lm_head), as mergekit's architecture
tables place them for Llama-family models; here a tensor outside the layers whose name
names an embedding (embed, wte, wpe, word_embeddings) is an embedding.

How the roles are found: with a method that takes task vectors or interpolates from the
base, the source whose model is base_model is the base in every slice, and the other
sources, in order, are the models: source position j (after the base) is "model j" in
every slice, so all slices merge the same number of models. Parameters follow mergekit's
precedence per slice: a source's own, then the slice's, then the top-level ones.
With a soup (linear, passthrough) every source is a model.

A role is then a `SlicedCheckpoint`: a virtual checkpoint whose tensor names are the
output's and whose data come from the real checkpoints' layers. The engine, the planner
and the cost model see it as any checkpoint, so nothing else knows about slices.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .lazy import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import MergeInputError
from .layers import find_block, stack_depths

_EMBEDDING = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|word_embeddings")
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}


@dataclass(frozen=True)
class LayerRange:
    """Layers start..end-1 of one checkpoint, and where the config says so (for messages)."""

    path: Path
    start: int
    end: int
    where: str

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Slice:
    base: LayerRange | None
    models: tuple[LayerRange, ...]

    @property
    def length(self) -> int:
        return self.models[0].length


@dataclass
class ParsedSlices:
    """What `slices:` says, in the terms of a models: config."""

    slices: tuple[Slice, ...]
    models: list[Path]                  # each role's first-slice model, for labels
    model_params: dict[str, list]       # per-role parameters, as models[].parameters (slices[0]'s)
    params: dict[str, Any]              # the slices' parameters (over the top-level ones; slices[0]'s)
    # Where slices differ in their parameters: each slice's (params, model_params), else None.
    per_slice: tuple[tuple[dict, dict], ...] | None = None


def same_model(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def parse(doc: Any, *, base: Path | None, base_is_role: bool, source: str,
          resolve: Callable[[Any, str], Path]) -> ParsedSlices:
    """Read a config's `slices:` list; base_is_role: the method takes the base apart from the models."""
    def fail(message: str) -> MergeInputError:
        return MergeInputError(f"{source}: {message}")

    if not isinstance(doc, list) or not doc:
        raise fail("slices: must be a non-empty list of {sources: [{model: PATH, layer_range: [START, END]}, ...]}.")
    slices, role_params, slice_params = [], [], []
    for s, entry in enumerate(doc):
        where = f"slices[{s}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise fail(f"{where} must be a mapping with a non-empty 'sources' list.")
        unknown = set(entry) - _SLICE_KEYS
        if unknown:
            raise fail(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a slice has sources and parameters.")
        if entry.get("residual_weight") is not None:
            raise fail(f"{where}.residual_weight is not supported; remove it.")
        if entry.get("base_model") is not None and (base is None or not same_model(resolve(entry["base_model"], f"{where}.base_model"), base)):
            raise fail(f"{where}.base_model: a per-slice base model is not supported; give one top-level base_model.")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise fail(f"{where}.parameters must be a mapping.")
        slice_params.append(params)
        ranges, here = [], []
        base_range = None
        for j, src in enumerate(entry["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise fail(f"{at} must be a mapping with 'model' and 'layer_range: [START, END]'.")
            unknown = set(src) - _SOURCE_KEYS
            if unknown:
                raise fail(f"{at}: unknown key(s) {', '.join(sorted(unknown))}; a source has model, layer_range "
                           "and parameters.")
            lr = src["layer_range"]
            if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr) or not 0 <= lr[0] < lr[1]):
                raise fail(f"{at}.layer_range must be [START, END] with 0 <= START < END (layers START..END-1), "
                           f"got {lr!r}.")
            path = resolve(src["model"], f"{at}.model")
            if any(same_model(path, r.path) for r in ranges + ([base_range] if base_range else [])):
                raise fail(f"{at}: {path} is a source of {where} twice; each model once per slice.")
            layer_range = LayerRange(path, lr[0], lr[1], f"{at}.layer_range")
            if base_is_role and base is not None and same_model(path, base):
                base_range = layer_range
                continue   # the base's parameters are ignored, as mergekit ignores them
            ranges.append(layer_range)
            here.append(src.get("parameters") or {})
        lengths = {r.length for r in ranges + ([base_range] if base_range else [])}
        if len(lengths) > 1:
            raise fail(f"{where}: its sources have different lengths ({', '.join(f'{r.where} = {r.length}' for r in ranges)}"
                       "); all sources of a slice must give the same number of layers.")
        if base_is_role and base is not None and base_range is None:
            raise fail(f"{where} has no source from base_model ({base}); add the base with the layer_range its "
                       "layers come from (mergekit: 'Base input is not present in merge inputs').")
        if not ranges:
            raise fail(f"{where} has only the base as a source; it needs at least one other model.")
        if slices and len(ranges) != len(slices[0].models):
            raise fail(f"{where} merges {len(ranges)} model(s) but slices[0] merges {len(slices[0].models)}; every "
                       "slice must merge the same number of models (source j after the base is model j in each).")
        for j, p in enumerate(here):
            if not isinstance(p, dict):
                raise fail(f"{where}.sources[{j}].parameters must be a mapping.")
        role_params.append(here)
        slices.append(Slice(base_range, tuple(ranges)))

    def per_model(roles: list[dict]) -> dict[str, list]:
        out: dict[str, list] = {}
        for j, p in enumerate(roles):
            for name, value in p.items():
                out.setdefault(name, [None] * len(roles))[j] = value
        return out

    sets = [(dict(p), per_model(r)) for p, r in zip(slice_params, role_params)]
    uniform = all(st == sets[0] for st in sets)
    return ParsedSlices(tuple(slices), [r.path for r in slices[0].models], sets[0][1], sets[0][0],
                        None if uniform else tuple(sets))


# -- the virtual checkpoints ---------------------------------------------------------------
class SlicedCheckpoint:
    """One role of a sliced merge as a checkpoint: output tensor names, real checkpoints' data."""

    def __init__(self, label: str, routes: dict[str, tuple[Checkpoint, str]], aux_from: Checkpoint):
        self.label = label
        self._routes = routes
        self.tensors: dict[str, TensorInfo] = {out: ckpt.tensors[name] for out, (ckpt, name) in routes.items()}
        used = list({id(c): c for c, _ in routes.values()}.values())
        self.paths = [c.path for c in used]
        self.files = [f for c in used for f in c.files]
        self.path = aux_from.path
        self._aux = aux_from

    def source_of(self, name: str) -> str:
        """Where output tensor `name` comes from, for messages."""
        ckpt, src = self._routes[name]
        return f"'{src}' of {ckpt.label}"

    def tensor(self, name: str) -> torch.Tensor:
        ckpt, src = self._routes[name]
        return ckpt.tensor(src)

    def stored(self, name: str) -> tuple[Checkpoint, str]:
        """The real checkpoint output tensor `name` is read from, and its name there."""
        return self._routes[name]

    def prefetch(self, name: str) -> None:
        ckpt, src = self._routes[name]
        ckpt.prefetch(src)

    def release(self, name: str) -> None:
        ckpt, src = self._routes[name]
        ckpt.release(src)

    def release_range(self, name: str, start: int, end: int) -> None:
        ckpt, src = self._routes[name]
        ckpt.release_range(src, start, end)

    def aux_files(self) -> list[Path]:
        return self._aux.aux_files()

    def close(self) -> None:
        for ckpt, _ in self._routes.values():
            ckpt.close()


def _layers_of(ckpt: Checkpoint, where: str, source: str) -> dict[int, list[str]]:
    """The checkpoint's tensors by layer index (its one stack), checked to be a single stack."""
    stacks = stack_depths(ckpt.tensors)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise MergeInputError(f"{source}: {where}: slices need a model with one stack of layers; {ckpt.label} has "
                              f"{len(stacks)} ({found}). Merge whole models instead.")
    by_index: dict[int, list[str]] = {}
    for name in ckpt.tensors:
        block = find_block(name)
        if block is not None:
            by_index.setdefault(block.index, []).append(name)
    return by_index


def _renamed(name: str, index: int) -> str:
    """`name` (inside a block) with its block index replaced by `index`."""
    block = find_block(name)
    head = len(block.stack) + 1
    return f"{name[:head]}{index}{name[head + len(str(block.index)):]}"


@dataclass
class SlicedInputs:
    """A sliced merge's inputs: the base's and each model's virtual checkpoint; each output
    tensor's mergekit position t (offset / (n - 1) within its slice; 1 in a one-layer slice; 0
    outside the layers) and its slice (outside the layers: the first slice for embeddings, the
    last for the rest, whose parameters mergekit uses for them); the output's layer count."""

    base: SlicedCheckpoint | None
    models: list[SlicedCheckpoint]
    depths: dict[str, float]
    slice_of: dict[str, int]
    layers: int


def views(slices: tuple[Slice, ...], open_checkpoint: Callable[[Path], Checkpoint], source: str) -> SlicedInputs:
    """The sliced merge's inputs (SlicedInputs), every range checked against its model's layers."""
    layers: dict[str, dict[int, list[str]]] = {}
    opened: dict[str, Checkpoint] = {}

    def checked(r: LayerRange) -> tuple[Checkpoint, dict[int, list[str]]]:
        key = os.path.realpath(r.path)
        if key not in opened:
            opened[key] = open_checkpoint(r.path)
            layers[key] = _layers_of(opened[key], r.where, source)
        ckpt, by_index = opened[key], layers[key]
        n = max(by_index) + 1
        if r.end > n:
            raise MergeInputError(f"{source}: {r.where} [{r.start}, {r.end}] asks for layers {r.start}..{r.end - 1} of "
                                  f"{ckpt.label}, which has {n} layers (0..{n - 1}). Fix the range.")
        return ckpt, by_index

    depths: dict[str, float] = {}
    slice_of: dict[str, int] = {}   # each output tensor's slice (outside the layers: the first or last)

    def role(ranges: list[LayerRange], label: str) -> SlicedCheckpoint:
        first, _ = checked(ranges[0])
        last, _ = checked(ranges[-1])
        routes: dict[str, tuple[Checkpoint, str]] = {}
        outside = [n for n in first.tensors if find_block(n) is None]
        for name in outside:
            if _EMBEDDING.search(name):
                routes[name] = (first, name)
                slice_of[name] = 0
        k = 0
        for index, r in enumerate(ranges):
            ckpt, by_index = checked(r)
            for offset in range(r.length):
                for name in by_index.get(r.start + offset, []):
                    out = _renamed(name, k)
                    routes[out] = (ckpt, name)
                    depths[out] = offset / (r.length - 1) if r.length > 1 else 1.0
                    slice_of[out] = index
                k += 1
        for name in [n for n in last.tensors if find_block(n) is None and not _EMBEDDING.search(n)]:
            routes[name] = (last, name)
            slice_of[name] = len(ranges) - 1
        for name in routes:
            depths.setdefault(name, 0.0)
        return SlicedCheckpoint(label, routes, first)

    try:
        base = None
        if slices[0].base is not None:
            base = role([s.base for s in slices], f"base model ({slices[0].base.path}, sliced)")
        models = [role([s.models[j] for s in slices], f"model {j + 1} ({slices[0].models[j].path}, sliced)")
                  for j in range(len(slices[0].models))]
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    return SlicedInputs(base, models, depths, slice_of, sum(s.length for s in slices))
