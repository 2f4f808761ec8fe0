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

The rows themselves are realigned by lines_fast/realign.py; the output's tokenizer files and chat
template are written by lines_fast/tokenizer_files.py.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .lazy import torch

from .dtypes import DType
from .errors import MergeInputError

# Tokenizer files of other formats: a model that has one has a vocabulary of its own.
SLOW_FORMATS = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                "merges.txt")
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
    dtype: DType | None = None   # the config's dtype

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
        ids = dict(own)
        for i, entry in added.items():
            ids[str(entry["content"])] = i   # an added token's id wins, as in the tokenizers library
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise MergeInputError(f"{file} (tokenizer of {label}) is not a tokenizer.json lines_fast can read ({err}); "
                              "re-save the tokenizer with transformers (AutoTokenizer.from_pretrained(...)"
                              ".save_pretrained(...)) or fix the file.") from None
    unlisted = [t for t in _configured_special_tokens(folder) if t not in ids]
    if unlisted:
        # transformers adds these when it loads the tokenizer (mergekit's vocabulary has them).
        raise MergeInputError(f"{folder / 'tokenizer_config.json'} (tokenizer of {label}) names special token(s) "
                              f"{', '.join(map(repr, unlisted[:5]))} that its tokenizer.json lacks; transformers adds "
                              "them on loading, so the vocabulary would differ from mergekit's. Re-save the "
                              "tokenizer (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) to write them in.")
    return Vocabulary(file, doc, ids, added, len(own), _config_vocab_size(folder))


def _configured_special_tokens(folder: Path) -> list[str]:
    """The special tokens tokenizer_config.json names (bos/eos/unk/pad/... tokens, additional ones,
    added_tokens_decoder)."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(cfg, dict):
        return []

    def content(value):
        return value.get("content") if isinstance(value, dict) else value

    found = [content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                                            "cls_token", "mask_token")]
    extra = cfg.get("additional_special_tokens")
    found += [content(v) for v in extra] if isinstance(extra, list) else []
    decoder = cfg.get("added_tokens_decoder")
    found += [content(v) for v in decoder.values()] if isinstance(decoder, dict) else []
    return list(dict.fromkeys(t for t in found if isinstance(t, str) and t))


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
    forced: bool = False             # some tokens: entry forces its row in every model

    def is_identity(self, rows: list[int]) -> bool:
        """Whether every input's rows (`rows`: every vocabulary tensor's row count) are already in
        the output's order: nothing to realign."""
        n = len(self.ids)
        want = torch.arange(n)
        return (not self.forced and self.rows == n and all(r == n for r in rows)
                and all(torch.equal(m, want) for m in self.row_maps))


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
        if (all(v is None for v in vocabs) and src is None and spec.source != "union" and not spec.tokens
                and not spec.pad_to_multiple_of):
            return None
        missing = labels[first] if base is None else src_label
        # What asks for a vocabulary: a union, tokens:, padding (else the source's files are copied).
        needs = ("tokens:" if spec.tokens and not isinstance(spec.source, Path) and spec.source != "union"
                 else f"pad_to_multiple_of: {spec.pad_to_multiple_of}" if (
                     spec.pad_to_multiple_of and all(v is None for v in vocabs) and src is None)
                 else f"tokenizer_source: {spec.source}")
        raise MergeInputError(
            f"{missing} has no tokenizer.json, which {needs} needs to build the output's "
            "vocabulary (mergekit reads it through transformers, converting a SentencePiece tokenizer.model; "
            "lines_fast reads tokenizer.json only). Save a fast tokenizer there first (transformers: "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes tokenizer.json), or drop "
            "tokenizer_source to copy the base's tokenizer files as they are.")
    base = _stripped(base, labels[first])
    for i, v in enumerate(vocabs):
        if v is None and i != first:
            slow = [n for n in SLOW_FORMATS if (Path(folders[i]) / n).is_file()]
            if slow:
                raise MergeInputError(
                    f"{labels[i]} has a tokenizer ({', '.join(slow)}) but no tokenizer.json, which lines_fast reads "
                    "(mergekit converts it through transformers). Save a fast tokenizer there first "
                    "(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes tokenizer.json).")
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
                 [v.ids for v in own], out.new, any(t.force for _, t in spec.tokens))


_VOCABULARY_TENSOR = re.compile(r"embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings|shared\.weight"
                                r"|(^|\.)output\.weight")


def is_vocabulary_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Embedding and output-head matrices, whose rows are token ids (mergekit's vocabulary_axis 0)."""
    return len(shape) == 2 and bool(_VOCABULARY_TENSOR.search(name))
