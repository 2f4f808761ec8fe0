"""Vocabularies: mergekit's tokenizer_source / tokenizer: block, read and written without transformers.

With `tokenizer_source` (union, base or a model) or a `tokenizer:` block, mergekit 0.1.5 builds
the output's vocabulary and then gives every model's embedding and lm_head rows in that
vocabulary's order before the merge sees them (its PermutedVocabulary). This module does the
same from the tokenizer.json files:

- The output vocabulary. `base`: the base's tokenizer, stripped of tokens whose id is past the
  base's config vocab_size. A model path: that model's tokenizer. `union`: the stripped base,
  then every model's tokens the base lacks, appended (plain tokens first, then the models'
  added tokens), ids assigned as the tokenizers library assigns them. The keys of `tokens:`
  are added too when missing.
- Each model's row map: output id -> the model's own id (-1 where it lacks the token, or where
  its id is past its config vocab_size).
- The rows a model lacks, from mergekit's rules: a `tokens:` entry decides (a model's row, a
  named token of a model, zero; `force` replaces the row in every model); otherwise the one
  model that has the token gives it, or the base when it has it, or the average of the models
  that have it; no model: zero. Rows past the vocabulary (pad_to_multiple_of) are the mean of
  the vocabulary's rows.

Arithmetic is mergekit's: rows are copied exactly; averages are summed model by model in the
inputs' dtype (the config's `dtype` when given, as mergekit casts there), then divided.
Deliberate difference: mergekit numbers the new tokens of a union in hash-map order, which
changes from run to run; here they come in model order (base, then the models as listed), each
model's by its own id, so a merge is reproducible.
"""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MergeInputError

# Tokenizer files that spell a vocabulary out in another format: left out of an output whose
# vocabulary differs from its source's (they would contradict its tokenizer.json).
SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                        "merges.txt", "added_tokens.json")
# The files of a tokenizer, copied into the output from its source.
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template",
                      "spiece", "sentencepiece")
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


# -- what the config asks for ---------------------------------------------------------------
@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from (mergekit's TokenEmbeddingConfig): kind "model" (that
    model's row of the token), "model_token" (that model's row of another token or id), "zero",
    or "default" (mergekit's rules); force: replace the row in every model."""

    kind: str = "default"
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output's vocabulary: source "union", "base" or a model path; tokens: per-token row
    sources (their keys are added to the vocabulary); pad_to_multiple_of; dtype: the config's
    `dtype`, in which mergekit averages rows."""

    source: str | Path = "union"
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None
    dtype: torch.dtype | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "pad_to_multiple_of": self.pad_to_multiple_of,
                "tokens": {t: [s.kind, str(s.model) if s.model else None, s.token, s.token_id, s.force]
                           for t, s in self.tokens},
                "dtype": str(self.dtype) if self.dtype else None}


# -- one model's tokenizer --------------------------------------------------------------------
@dataclass
class Vocabulary:
    """A tokenizer.json, read: every token's id (the model's vocabulary and the added tokens, as
    transformers' get_vocab gives them), the added tokens by id, the size of the model's own
    vocabulary, and the config's vocab_size (the embedding's rows; None if the config lacks it)."""

    file: Path
    doc: dict
    ids: dict[str, int]
    added: dict[int, dict]
    model_size: int
    size: int | None

    @property
    def rows(self) -> int:
        """The rows a token id must stay below (mergekit: the config's vocab_size, else the vocabulary)."""
        return self.size if self.size is not None else len(self.ids)

    def by_id(self) -> list[tuple[str, int]]:
        return sorted(self.ids.items(), key=lambda kv: (kv[1], kv[0]))


def read(folder: Path, label: str) -> Vocabulary | None:
    """The vocabulary of a model directory from its tokenizer.json; None if it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        folder = folder.parent if folder.name.endswith(".index.json") else folder
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        model = doc["model"]
        vocab = model["vocab"]
        if isinstance(vocab, dict):
            own = {str(t): int(i) for t, i in vocab.items()}
        elif isinstance(vocab, list):   # Unigram: [piece, score] by id
            own = {str(entry[0]): i for i, entry in enumerate(vocab)}
        else:
            raise TypeError("model.vocab is neither a mapping nor a list")
        added = {int(e["id"]): dict(e) for e in doc.get("added_tokens") or []}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise MergeInputError(f"{file} (tokenizer of {label}) is not a tokenizer.json lines_fast can read ({err}); "
                              "re-save the tokenizer with transformers (AutoTokenizer.from_pretrained(...)"
                              ".save_pretrained(...)) or fix the file.") from None
    ids = dict(own)
    for i, entry in added.items():
        ids[str(entry["content"])] = i   # an added token's id wins, as in the tokenizers library
    return Vocabulary(file, doc, ids, added, len(own), _config_vocab_size(folder))


def _config_vocab_size(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for where in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(where, dict) and isinstance(where.get("vocab_size"), int):
            return where["vocab_size"]
    return None


def _stripped(v: Vocabulary, label: str) -> Vocabulary:
    """mergekit's stripped base tokenizer: tokens with ids >= the config's vocab_size removed."""
    unused = {t for t, i in v.ids.items() if i >= v.rows}
    if not unused:
        return v
    doc = copy.deepcopy(v.doc)
    if doc["model"].get("type") != "BPE":
        raise MergeInputError(f"{v.file} (tokenizer of {label}) has {len(unused)} token(s) past the config's "
                              f"vocab_size {v.rows}, and its model is {doc['model'].get('type')}: mergekit strips "
                              "those only from BPE tokenizers, and so does lines_fast. Set vocab_size in its "
                              "config.json to cover the tokenizer, or pick another tokenizer_source.")
    doc["added_tokens"] = [e for e in doc.get("added_tokens") or [] if int(e["id"]) < v.rows]
    for t in unused:
        doc["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    doc["model"]["merges"] = [m for m in doc["model"].get("merges") or [] if keep(m)]
    ids = {t: i for t, i in v.ids.items() if t not in unused}
    added = {i: e for i, e in v.added.items() if i < v.rows}
    return Vocabulary(v.file, doc, ids, added, len(doc["model"]["vocab"]), v.size)


class _Building:
    """An output vocabulary being built, adding tokens as the tokenizers library's add_tokens does."""

    def __init__(self, start: Vocabulary):
        self.doc = copy.deepcopy(start.doc)
        self.ids = dict(start.ids)
        self.added = {i: dict(e) for i, e in start.added.items()}
        self.model_size = start.model_size
        self.new: list[str] = []

    def _next_id(self) -> int:
        if not self.added:
            return self.model_size
        top = max(self.added)
        return top + 1 if top >= self.model_size or self.model_size == 0 else self.model_size

    def add(self, entry: dict) -> None:
        content = str(entry["content"])
        at = self.ids.get(content)
        if at is not None:
            same = self.added.get(at)
            if same is not None and all(same.get(f) == entry.get(f) for f in _FLAGS):
                return
        else:
            at = self._next_id()
            self.new.append(content)
        self.added[at] = {"id": at, "content": content, **{f: bool(entry.get(f, False)) for f in _FLAGS}}
        self.ids[content] = at

    def add_plain(self, content: str) -> None:
        """A token added by name (transformers' add_tokens of a string): normalized, not special."""
        if content not in self.ids:
            self.add({"content": content, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": True, "special": False})

    def document(self) -> dict:
        self.doc["added_tokens"] = [self.added[i] for i in sorted(self.added)]
        return self.doc


# -- the merge's vocabulary ----------------------------------------------------------------------
@dataclass
class Built:
    """The output vocabulary and each input's row map (output id -> its own id, or -1)."""

    ids: dict[str, int]
    rows: int                        # the output embedding's rows (the vocabulary, padded)
    tokenizer_json: dict | None      # the output's tokenizer.json; None: the source's, unchanged
    source_folder: Path              # whose other tokenizer files the output takes
    row_maps: list[torch.Tensor]     # per input (the merge's order), int64 [rows of the vocabulary]
    originals: list[dict[str, int]]  # per input, its own vocabulary (for `token:` sources)
    new_tokens: list[str] = field(default_factory=list)

    def is_identity(self, rows: list[int]) -> bool:
        """Whether every input's rows (`rows`: every vocabulary tensor's row count) are already in
        the output's order: nothing to realign."""
        n = len(self.ids)
        want = torch.arange(n)
        return self.rows == n and all(r == n for r in rows) and all(torch.equal(m, want) for m in self.row_maps)


def build(spec: TokenizerSpec, folders: list[Path], labels: list[str], base_index: int | None,
          log: Callable[[str], None]) -> Built | None:
    """The output vocabulary of a merge of the checkpoints in `folders` (the merge's inputs in
    order; base_index: the base among them, or None). None when no input has a tokenizer.json
    and the source is not union: the caller copies the source's tokenizer files as they are."""
    vocabs = [read(f, label) for f, label in zip(folders, labels)]
    first = base_index if base_index is not None else 0
    base = vocabs[first]
    if isinstance(spec.source, Path):
        src_label = f"tokenizer source {spec.source}"
        src = read(spec.source, src_label)
    else:
        src_label, src = labels[first], base
    if base is None or src is None:
        if all(v is None for v in vocabs) and src is None and spec.source != "union" and not spec.tokens:
            return None
        missing = labels[first] if base is None else src_label
        raise MergeInputError(
            f"{missing} has no tokenizer.json, which tokenizer_source: {spec.source} needs to build the output's "
            "vocabulary (mergekit reads it through transformers, converting a SentencePiece tokenizer.model; "
            "lines_fast reads tokenizer.json only). Save a fast tokenizer there first (transformers: "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes tokenizer.json), or drop "
            "tokenizer_source to copy the base's tokenizer files as they are.")
    base = _stripped(base, labels[first])
    for i, v in enumerate(vocabs):
        if v is None and i != first:
            log(f"{labels[i]} has no tokenizer.json: its vocabulary is taken to be {labels[first]}'s, as mergekit does")
    # A model without a tokenizer has the base's vocabulary and its own config's vocab_size.
    own = [base if i == first else (v if v is not None else replace(base, size=_config_vocab_size(Path(folders[i]))))
           for i, v in enumerate(vocabs)]

    if spec.source == "union":
        out = _Building(base)
        plain: dict[str, None] = {}
        added: dict[str, dict] = {}
        for i in [first] + [j for j in range(len(own)) if j != first]:
            v = own[i]
            limit = v.size if v.size is not None else v.model_size
            for token, idx in v.by_id():
                if idx < limit:
                    plain.setdefault(token)
            for idx in sorted(v.added):
                if idx < limit:
                    entry = v.added[idx]
                    first_seen = added.setdefault(entry["content"], entry)
                    if bool(first_seen.get("special")) != bool(entry.get("special")):
                        raise MergeInputError(
                            f"token {entry['content']!r} is a special token in one model's tokenizer and an "
                            f"ordinary one in another's ({labels[i]}, {v.file}): a union of the two cannot "
                            "tokenize it both ways (mergekit keeps the first model's setting with a warning). "
                            "Use tokenizer_source: base (or a model's path) to take one tokenizer as it is, or "
                            "fix the tokenizer whose setting is wrong.")
                    if any(first_seen.get(f) != entry.get(f) for f in _FLAGS):
                        log(f"token {entry['content']!r} is added with other settings in {labels[i]}; "
                            "the first model's settings are kept (as mergekit)")
        for token in plain:
            if token not in added and token not in base.ids:
                out.add_plain(token)
        for entry in added.values():
            out.add(entry)
    else:
        out = _Building(src if isinstance(spec.source, Path) else base)
    for token, _ in spec.tokens:
        out.add_plain(token)
    original = (src if isinstance(spec.source, Path) else vocabs[first]).doc
    doc = out.document()
    changed = doc["model"] != original["model"] or (
        sorted(doc["added_tokens"], key=lambda e: e["id"]) != sorted(original.get("added_tokens") or [],
                                                                     key=lambda e: int(e["id"])))
    ids = out.ids
    n = len(ids)
    if ids and max(ids.values()) >= n:
        raise MergeInputError(f"the output vocabulary (from {src_label}) has {n} tokens but ids up to "
                              f"{max(ids.values())}: its ids have gaps, which mergekit's row layout cannot hold. "
                              "Use a tokenizer with contiguous ids.")
    rows = n
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    maps = []
    for v in own:
        m = torch.full((n,), -1, dtype=torch.int64)
        limit = v.rows
        for token, new in ids.items():
            old = v.ids.get(token)
            if old is not None and old < limit:
                m[new] = old
        maps.append(m)
    source_folder = spec.source if isinstance(spec.source, Path) else Path(folders[first])
    if out.new:
        log(f"output vocabulary: {n} tokens ({len(out.new)} new: {', '.join(repr(t) for t in out.new[:8])}"
            f"{' ...' if len(out.new) > 8 else ''})")
    return Built(ids, rows, doc if changed else None, source_folder, maps,
                 [v.ids for v in own], out.new)


_VOCABULARY_TENSOR = re.compile(r"embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings|shared\.weight"
                                r"|(^|\.)output\.weight")


def is_vocabulary_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Embedding and output-head matrices, whose rows are token ids (mergekit's vocabulary_axis 0)."""
    return len(shape) == 2 and bool(_VOCABULARY_TENSOR.search(name))


# -- the rows, realigned --------------------------------------------------------------------------
def realign(tensors: list[torch.Tensor], built: Built, spec: TokenizerSpec, base_index: int | None,
            model_index: Callable[[Path], int | None], name: str, labels: list[str]) -> list[torch.Tensor]:
    """Every input's rows of one vocabulary tensor in the output vocabulary's order (mergekit's
    PermutedVocabulary), in the inputs' promoted dtype (or the config's dtype)."""
    dtype = spec.dtype
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
            j = model_index(cfg.model)
            if j is None:
                raise MergeInputError(f"tokenizer.tokens[{token!r}] takes its row from {cfg.model}, which is not "
                                      f"among this merge's models; name one of them.")
            if cfg.kind == "model_token":
                src = cfg.token_id if cfg.token is None else built.originals[j].get(cfg.token)
                if src is None:
                    raise MergeInputError(f"tokenizer.tokens[{token!r}]: token {cfg.token!r} is not in the "
                                          f"vocabulary of {labels[j]}.")
                if not 0 <= src < tensors[j].shape[0]:
                    raise MergeInputError(f"tokenizer.tokens[{token!r}]: token id {src} is outside {name} of "
                                          f"{labels[j]} ({tensors[j].shape[0]} rows).")
                defaults[token_id] = tensors[j][src]
            else:
                src = int(maps[j][token_id])
                if src < 0:
                    raise MergeInputError(f"tokenizer.tokens[{token!r}] takes its row from {labels[j]}, whose "
                                          "vocabulary lacks that token; pick a model that has it, or a "
                                          "{kind: model_token, ...} source.")
                defaults[token_id] = tensors[j][src]
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

    def __init__(self, inner, realigner: _Realigner, j: int, rows: int, dtype_of: Callable[[str], torch.dtype]):
        self._inner, self._realigner, self._j = inner, realigner, j
        self.tensors = dict(inner.tensors)
        for name in realigner.names:
            info = inner.tensors[name]
            shape = (rows, *info.shape[1:])
            dtype = dtype_of(name)
            numel = 1
            for d in shape:
                numel *= d
            self.tensors[name] = replace(info, shape=shape, dtype=dtype, nbytes=numel * dtype.itemsize)

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
    if not names or built.is_identity(rows):
        return inputs
    missing = [(c.label, n) for c in inputs for n in names if n not in c.tensors]
    if missing:
        raise MergeInputError(f"{missing[0][0]} has no tensor '{missing[0][1]}', a vocabulary tensor of the base.")

    def dtype_of(name: str) -> torch.dtype:
        if spec.dtype is not None:
            return spec.dtype
        d = inputs[0].tensors[name].dtype
        for c in inputs[1:]:
            d = torch.promote_types(d, c.tensors[name].dtype)
        return d

    shared = _Realigner(inputs, built, spec, base_index, names, model_index)
    return [RealignedCheckpoint(c, shared, j, built.rows, dtype_of) for j, c in enumerate(inputs)]


# -- the output's tokenizer files ---------------------------------------------------------------
def chat_template(value: str, folders: list[Path], source: str) -> str | None:
    """The chat template to write: `auto` (the most common among the inputs, mergekit's choice), a
    built-in name (chatml), or the template itself; None when auto finds none."""
    if value == "auto":
        found = [t for t in (template_of(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in BUILT_IN_TEMPLATES:
            return BUILT_IN_TEMPLATES[value]
        raise MergeInputError(f"{source}: chat_template: {value!r} is not a template lines_fast knows by name (it has "
                              f"{', '.join(sorted(BUILT_IN_TEMPLATES))} and auto; mergekit also names alpaca, exaone, "
                              "llama3 and mistral). Paste the Jinja template itself as the value.")
    if len(value) < 20 or "{" not in value:
        raise MergeInputError(f"{source}: chat_template: {value!r} is not a Jinja chat template (mergekit refuses "
                              "it too: a template has {{ }} or {% %} and at least 20 characters).")
    return value


def template_of(folder: Path) -> str | None:
    """A model's chat template: chat_template.jinja, or tokenizer_config.json's chat_template
    (its `default` entry when it lists several), stripped (mergekit compares them stripped)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    elif isinstance(t, dict):
        t = t.get("default")
    return t.strip() or None if isinstance(t, str) else None


# ChatML, as OpenAI documents it: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message.
BUILT_IN_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


def output_files(files: list[Path], built: Built | None, template: str | None, scratch: Path,
                 log: Callable[[str], None]) -> list[Path]:
    """The tokenizer files to write: `files` (the source's), with tokenizer.json replaced by the
    built vocabulary's, the formats that would contradict it left out, tokenizer_config.json's
    added tokens updated, and the chat template written into tokenizer_config.json and
    chat_template.jinja (transformers 5 reads the file, earlier versions the config key)."""
    by_name = {f.name: f for f in files}
    if built is not None and built.tokenizer_json is not None:
        dropped = [n for n in by_name if n in SLOW_TOKENIZER_FILES]
        for n in dropped:
            del by_name[n]
        if dropped:
            log(f"the output vocabulary differs from {built.source_folder}'s: not copying {', '.join(dropped)} "
                "(tokenizer.json holds the new vocabulary)")
        out = scratch / "tokenizer.json"
        out.write_text(json.dumps(built.tokenizer_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        by_name["tokenizer.json"] = out
    config_file = by_name.get("tokenizer_config.json")
    if config_file is not None and (template is not None or (built is not None and built.tokenizer_json)):
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MergeInputError(f"{config_file}: not valid JSON ({err}); the output's tokenizer_config.json "
                                  "is made from it. Fix the file.") from None
        if built is not None and built.tokenizer_json and isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {
                str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                  "special")}
                for e in built.tokenizer_json["added_tokens"]}
        if template is not None:
            cfg["chat_template"] = template
        out = scratch / "tokenizer_config.json"
        out.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        by_name["tokenizer_config.json"] = out
    if template is not None:
        by_name.pop("chat_template.json", None)
        out = scratch / "chat_template.jinja"
        out.write_text(template, encoding="utf-8")
        by_name["chat_template.jinja"] = out
    return list(by_name.values())
