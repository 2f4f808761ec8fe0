"""Every input's embedding and lm_head rows in the output vocabulary's order (mergekit 0.1.5's
PermutedVocabulary): the rules in lines_fast/vocabulary.py's docstring and docs/methods.md.

A realigned input is a virtual checkpoint (RealignedCheckpoint), as a sliced one is, so the
engine, the planner and the backends merge it like any other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .lazy import torch

from .errors import MergeInputError
from . import dtypes
from .dtypes import DType
from .vocabulary import Built, TokenizerSpec, is_vocabulary_tensor


def realign(tensors: list[torch.Tensor], built: Built, spec: TokenizerSpec, base_index: int | None,
            model_index: Callable[[Path], int | None], name: str, labels: list[str]) -> list[torch.Tensor]:
    """Every input's rows of one vocabulary tensor in the output vocabulary's order (mergekit's
    PermutedVocabulary), in the inputs' promoted dtype (or the config's dtype)."""
    dtype = spec.dtype.torch if spec.dtype is not None else None
    if dtype is None:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]
    n = len(built.ids)
    maps = built.row_maps
    present = torch.stack([m >= 0 for m in maps])          # [inputs, tokens]
    counts = present.sum(0)
    configured = dict(spec.tokens)
    shape = tensors[0].shape[1:]
    defaults: dict[int, torch.Tensor] = {}
    # Only tokens some input lacks (or configured ones) need a row of their own.
    needed = torch.nonzero(counts < len(maps)).flatten().tolist()
    tokens_of = {i: t for t, i in built.ids.items()}
    for token in configured:
        needed.append(built.ids[token])
    for token_id in dict.fromkeys(needed):
        token = tokens_of[token_id]
        cfg = configured.get(token)
        if not (cfg is not None and cfg.force) and bool(counts[token_id] == len(maps)):
            continue   # every input has its own row, and it is kept
        if cfg is not None and cfg.kind != "default":
            if cfg.kind == "zero":
                defaults[token_id] = torch.zeros(shape, dtype=dtype)
                continue
            j = model_index(cfg.model)   # the model and its token were checked (_check_token_sources)
            if cfg.kind == "model_token":
                src = cfg.token_id if cfg.token is None else built.originals[j][cfg.token]
                if not 0 <= src < tensors[j].shape[0]:   # an id is known against the rows only
                    raise MergeInputError(f"tokenizer.tokens[{token!r}]: token id {src} is outside {name} of "
                                          f"{labels[j]} ({tensors[j].shape[0]} rows).")
                defaults[token_id] = tensors[j][src]
            else:
                defaults[token_id] = tensors[j][int(maps[j][token_id])]
            continue
        have = [j for j in range(len(maps)) if maps[j][token_id] >= 0]
        if len(have) == 1:
            defaults[token_id] = tensors[have[0]][int(maps[have[0]][token_id])]
        elif not have:
            defaults[token_id] = torch.zeros(shape, dtype=dtype)
        elif base_index is not None and maps[base_index][token_id] >= 0:
            defaults[token_id] = tensors[base_index][int(maps[base_index][token_id])]
        else:   # mergekit's order: a running sum in the dtype, then one division
            row = torch.zeros(shape, dtype=dtype)
            for j in have:
                row = row + tensors[j][int(maps[j][token_id])]
            defaults[token_id] = row / len(have)
    forced = [built.ids[t] for t, c in spec.tokens if c.force]
    out = []
    for j, t in enumerate(tensors):
        rows = torch.zeros((built.rows, *shape), dtype=dtype)
        keep = maps[j] >= 0
        if forced:
            keep[forced] = False
        where = torch.nonzero(keep).flatten()
        rows[where] = t.index_select(0, maps[j][where])
        for token_id, row in defaults.items():
            if not keep[token_id]:
                rows[token_id] = row
        if built.rows > n:
            rows[n:] = torch.mean(rows[:n], dim=0)
        out.append(rows)
    return out


class _Realigner:
    """The realigned rows of each vocabulary tensor, made once for all inputs and kept until every
    input has released them."""

    def __init__(self, inputs: list, built: Built, spec: TokenizerSpec, base_index: int | None,
                 names: list[str], model_index: Callable[[Path], int | None]):
        self.inputs, self.built, self.spec, self.base_index = inputs, built, spec, base_index
        self.names = set(names)
        self.model_index = model_index
        self._cache: dict[str, list[torch.Tensor]] = {}
        self._held: dict[str, set[int]] = {}

    def tensor(self, name: str, j: int) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = realign([c.tensor(name) for c in self.inputs], self.built, self.spec,
                                        self.base_index, self.model_index, name, [c.label for c in self.inputs])
            self._held[name] = set(range(len(self.inputs)))
            for c in self.inputs:
                c.release(name)
        return self._cache[name][j]

    def release(self, name: str, j: int) -> None:
        held = self._held.get(name)
        if held is not None:
            held.discard(j)
            if not held:
                del self._cache[name], self._held[name]


class RealignedCheckpoint:
    """An input whose vocabulary tensors have the output vocabulary's rows; the rest is the input's."""

    def __init__(self, inner, realigner: _Realigner, j: int, rows: int, dtype_of: Callable[[str], DType]):
        self._inner, self._realigner, self._j = inner, realigner, j
        self.tensors = dict(inner.tensors)
        for name in realigner.names:
            info = inner.tensors[name]
            shape = (rows, *info.shape[1:])
            dtype = dtype_of(name)
            numel = 1
            for d in shape:
                numel *= d
            self.tensors[name] = info._replace(shape=shape, dtype=dtype, nbytes=numel * dtype.itemsize)

    @property
    def realigned_names(self) -> list[str]:
        return sorted(self._realigner.names)

    def __getattr__(self, attr):   # label, path, paths, files, aux_files, ... are the input's
        return getattr(self._inner, attr)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._realigner.names:
            return self._realigner.tensor(name, self._j)
        return self._inner.tensor(name)

    def prefetch(self, name: str) -> None:
        if name not in self._realigner.names:
            self._inner.prefetch(name)

    def release(self, name: str) -> None:
        if name in self._realigner.names:
            self._realigner.release(name, self._j)
        else:
            self._inner.release(name)

    def release_range(self, name: str, start: int, end: int) -> None:
        if name not in self._realigner.names:
            self._inner.release_range(name, start, end)

    def close(self) -> None:
        self._inner.close()


def _check_token_sources(built: Built, spec: TokenizerSpec, model_index: Callable[[Path], int | None],
                         labels: list[str]) -> None:
    """The tokens: entries that name a model's row, checked before any row is read."""
    for token, cfg in spec.tokens:
        if cfg.model is None:
            continue
        j = model_index(cfg.model)
        where = f"tokenizer.tokens[{token!r}]"
        if j is None:
            raise MergeInputError(f"{where} takes its row from {cfg.model}, which is not among this merge's models; "
                                  "name one of them.")
        if cfg.kind == "model" and built.row_maps[j][built.ids[token]] < 0:
            raise MergeInputError(f"{where} takes its row from {labels[j]}, whose vocabulary lacks that token (mergekit "
                                  "stops there too); pick a model that has it, or a {kind: model_token, model: ..., "
                                  "token: ...} source.")
        if cfg.kind == "model_token" and cfg.token is not None and cfg.token not in built.originals[j]:
            raise MergeInputError(f"{where}: token {cfg.token!r} is not in the vocabulary of {labels[j]}.")


def realigned(inputs: list, built: Built, spec: TokenizerSpec, base_index: int | None,
              model_index: Callable[[Path], int | None]) -> list:
    """The inputs, their vocabulary tensors realigned (unchanged inputs when nothing moves)."""
    reference = inputs[base_index if base_index is not None else 0]
    names = [n for n, info in reference.tensors.items() if info.is_float and is_vocabulary_tensor(n, info.shape)]
    for c, m in zip(inputs, built.row_maps):
        for n in names:
            info = c.tensors.get(n)
            if info is None or len(info.shape) != 2:
                continue
            top = int(m.max()) if len(m) else -1
            if info.shape[0] <= top:
                raise MergeInputError(f"tensor '{n}' of {c.label} has {info.shape[0]} rows, but its vocabulary "
                                      f"has token ids up to {top}: the tokenizer does not belong to these weights.")
    _check_token_sources(built, spec, model_index, [c.label for c in inputs])
    rows = [c.tensors[n].shape[0] for c in inputs for n in names if n in c.tensors]
    if built.is_identity(rows):
        return inputs
    if not names:
        raise MergeInputError(f"the output vocabulary differs from the models' (or moves their rows), but "
                              f"{reference.label} has no tensor lines_fast knows as an embedding or output head "
                              "(names with embed_tokens, lm_head, wte, word_embeddings, embed_out, tok_embeddings, "
                              "output.weight); its rows cannot follow. Merge without tokenizer_source, or rename "
                              "the tensors.")
    missing = [(c.label, n) for c in inputs for n in names if n not in c.tensors]
    if missing:
        raise MergeInputError(f"{missing[0][0]} has no tensor '{missing[0][1]}', a vocabulary tensor of the base.")

    def dtype_of(name: str) -> DType:
        if spec.dtype is not None:
            return spec.dtype
        d = inputs[0].tensors[name].dtype
        for c in inputs[1:]:
            if c.tensors[name].dtype is not d:
                d = dtypes.of(torch.promote_types(d.torch, c.tensors[name].dtype.torch))
        return d

    shared = _Realigner(inputs, built, spec, base_index, names, model_index)
    return [RealignedCheckpoint(c, shared, j, built.rows, dtype_of) for j, c in enumerate(inputs)]
