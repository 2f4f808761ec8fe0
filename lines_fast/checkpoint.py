"""Reading safetensors checkpoints: headers up front, tensors as views of a memory map.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional
"__metadata__" object of strings), then the data buffer; offsets are relative to the buffer.

Opening a checkpoint reads and checks every header and nothing else, so a 70B model opens in
milliseconds and a bad file fails before any merging starts. `Checkpoint.tensor(name)` maps
the file once (read-only, shared) and returns a zero-copy view: pages come from the page cache
on first touch, and the merge never holds a second copy of its inputs. The views are backed
by read-only pages, so writing into one in place crashes the process: always compute into new
tensors.
"""
from __future__ import annotations

import fnmatch
import math
import operator
import json
import mmap
import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple, NoReturn

from .lazy import torch

from .dtypes import BY_CODE as DTYPES, DType
from .errors import MergeInputError


# The reference implementation refuses larger headers; a bigger length means the file is not
# safetensors (a renamed .bin, say), and reading it would allocate garbage.
MAX_HEADER_SIZE = 100_000_000

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Non-weight files a merged model needs next to its weights: config, generation settings,
# tokenizer, chat template, processor configs, and remote-code modules named by auto_map.
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
)


class TensorInfo(NamedTuple):
    """Where one tensor lives: its file and the absolute byte range of its data there.

    A named tuple rather than a frozen dataclass: a header of 10^5 entries makes 10^5 of
    them, and a tuple is built in less than half the time."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _describe(label: str, file: Path) -> str:
    """'label' (file) for messages, or just the file when the label is its path."""
    return f"'{file}'" if label == str(file) else f"checkpoint '{label}' ({file})"


def _bad_entry(where: str, name: str, entry, redo: str) -> NoReturn:
    """The message for a header entry that is not {dtype, shape, data_offsets} of the right types."""
    if not isinstance(entry, dict):
        raise MergeInputError(f"{where}, tensor '{name}': the header entry is not an object; the file is "
                              f"corrupt. {redo}")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype_name, str) and dtype_name in DTYPES):
        raise MergeInputError(
            f"{where}, tensor '{name}': unsupported dtype {dtype_name!r} (this build reads "
            f"{', '.join(DTYPES)}). Convert the model to one of these dtypes first."
        )
    if not (type(shape) is list and all(type(d) is int and d >= 0 for d in shape)):
        raise MergeInputError(f"{where}, tensor '{name}': the shape {shape!r} is not a list of non-negative "
                              f"integers; the file is corrupt. {redo}")
    raise MergeInputError(
        f"{where}, tensor '{name}': data_offsets {offsets!r} is not an ordered [begin, end] pair of "
        f"non-negative integers; the file is corrupt. {redo}"
    )


def read_header(file: Path, label: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads and checks one file's header; returns its tensors (by offset) and __metadata__.

    Touches only the first 8 + N bytes. Every number in the header is checked against the
    file size, so a later view can never point outside the file.
    """
    file = Path(file)
    where = _describe(str(file) if label is None else label, file)
    redo = "Re-download or re-copy the file, or re-save the model with safetensors."
    try:
        # Checked before open(): opening a FIFO would block until someone writes to it.
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise MergeInputError(f"{where} is not a regular file (a FIFO, device or socket?); lines_fast reads "
                                  "checkpoints from regular files only. Point at the .safetensors file itself.")
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise MergeInputError(
                    f"{where} is {size} bytes long, too short for a safetensors header; "
                    f"the file is truncated or not a safetensors file. {redo}"
                )
            first = f.read(8)
            n = int.from_bytes(first, "little")
            if n > MAX_HEADER_SIZE or 8 + n > size:
                if all(32 <= b < 127 or b in (9, 10, 13) for b in first):
                    raise MergeInputError(
                        f"{where} starts with text ({first.decode('ascii')!r}...), so it is not a safetensors "
                        "file (its first 8 bytes would be the header's length): a YAML config or another text "
                        "file given as a model? Point at the checkpoint's .safetensors file or directory.")
                raise MergeInputError(
                    f"{where}: the header length field says {n} bytes but the file is {size} "
                    f"bytes long; the file is truncated or not a safetensors file. {redo}"
                )
            raw = f.read(n)
    except OSError as e:
        raise MergeInputError(f"Cannot read {where}: {e.strerror or e}. Check the path and its permissions.") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeInputError(
            f"{where}: the header is not valid JSON ({e}); the file is corrupt or not a "
            f"safetensors file. {redo}"
        ) from None
    if not isinstance(header, dict):
        raise MergeInputError(
            f"{where}: the header is a JSON {type(header).__name__}, not an object; the file is "
            f"corrupt or not a safetensors file. {redo}"
        )

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MergeInputError(
            f"{where}: the header's __metadata__ is not a map of strings to strings; the file "
            f"is corrupt. {redo}"
        )

    data_start = 8 + n
    data_len = size - data_start
    infos = []
    append = infos.append
    dtypes = DTYPES
    for name, entry in header.items():
        # Written for the common case: a header of 10^5 entries is read in a fraction of a second.
        # The happy path is a few type checks per entry; a message is built only for a bad one.
        try:
            dtype, shape, (begin, end) = dtypes[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            _bad_entry(where, name, entry, redo)
        needed = dtype.itemsize
        if type(shape) is not list or type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            _bad_entry(where, name, entry, redo)
        for d in shape:
            if type(d) is not int or d < 0:
                _bad_entry(where, name, entry, redo)
            needed *= d
        if needed != end - begin:
            raise MergeInputError(
                f"{where}, tensor '{name}': dtype {entry['dtype']} and shape {list(shape)} need "
                f"{needed} bytes but data_offsets {[begin, end]} span "
                f"{end - begin}; the header is corrupt. {redo}"
            )
        if end > data_len:
            raise MergeInputError(
                f"{where}, tensor '{name}': the data ends at byte {data_start + end} but the file is only "
                f"{size} bytes long; the file is truncated or corrupt. {redo}"
            )
        append(TensorInfo(name, dtype, tuple(shape), file, data_start + begin, end - begin))

    infos.sort(key=operator.attrgetter("offset", "nbytes"))
    for prev, cur in zip(infos, infos[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise MergeInputError(
                f"{where}: the data of tensors '{prev.name}' and '{cur.name}' overlap; the "
                f"header is corrupt. {redo}"
            )
    return {i.name: i for i in infos}, metadata


class Checkpoint:
    """A model's weights: one safetensors file, or a directory in Hugging Face layout.

    `tensors` lists every tensor, file by file (shards in name order) and by offset within a
    file, which is the order that reads each file front to back.
    """

    def __init__(self, path: Path, label: str, tensors: dict[str, TensorInfo], files: list[Path]):
        self.path = path
        self.label = label
        self.tensors = tensors
        self.files = files
        self._maps: dict[Path, mmap.mmap] = {}
        self._bytes: dict[Path, torch.Tensor] = {}
        # Each file's size and mtime when its header was read: a file replaced or truncated
        # later (a re-download) would make the header's offsets lie, and reading past a
        # truncated end of a memory map kills the process (SIGBUS). tensor() checks first.
        self._identity = {f: _identity(f) for f in files}
        self._path_strings = {f: os.fspath(f) for f in files}

    @classmethod
    def open(cls, path: str | os.PathLike, label: str | None = None) -> "Checkpoint":
        """Reads and checks the headers (never the data) of a checkpoint file or directory."""
        path = Path(path)
        label = str(path) if label is None else label
        if not path.exists():
            raise MergeInputError(f"Checkpoint '{label}': the path '{path}' does not exist. Check the model path.")
        if path.is_dir():
            if (path / SINGLE_FILE).is_file():  # Hugging Face prefers the single file too
                return cls._from_files(path, label, [path / SINGLE_FILE])
            if (path / INDEX_FILE).is_file():
                return cls._from_index(path, label, path / INDEX_FILE)
            if (path / "adapter_config.json").is_file():
                raise MergeInputError(
                    f"Checkpoint '{label}': '{path}' is a PEFT adapter, not a model. An adapter can be merged as "
                    "one of the models (models: / --model) on top of the base it was trained on; it cannot be the "
                    "base or a slice source.")
            from .pickled import BIN_FILE, BIN_INDEX, PickledCheckpoint
            if (path / BIN_INDEX).is_file() or (path / BIN_FILE).is_file():
                return PickledCheckpoint.open_bin(path, label)
            return cls._from_files(path, label, [_only_safetensors(path, label)])
        if path.name.endswith((".bin.index.json", ".bin", ".pt", ".pth")):
            from .pickled import PickledCheckpoint
            return PickledCheckpoint.open_bin(path, label)
        if path.name.endswith(".index.json"):
            return cls._from_index(path, label, path)
        return cls._from_files(path, label, [path])

    @classmethod
    def _from_files(cls, path: Path, label: str, files: list[Path]) -> "Checkpoint":
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            tensors.update(read_header(file, label)[0])
        return cls(path, label, tensors, files)

    @classmethod
    def _from_index(cls, path: Path, label: str, index: Path) -> "Checkpoint":
        where = _describe(label, index)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            detail = "is not a JSON object" if isinstance(e, AttributeError) else f"is not valid JSON ({e})"
            raise MergeInputError(f"{where} {detail}. Re-download the index file.") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MergeInputError(
                f"{where} has no \"weight_map\" object mapping tensor names to shard files. "
                f"Re-download the index file."
            )
        shards = sorted(set(weight_map.values()))
        outside = [sh for sh in shards if not shard_name_is_inside(sh)]
        if outside:
            raise MergeInputError(
                f"{where} names shard file '{outside[0]}', which is outside '{index.parent}'. An index names "
                "shards by file name within the model's directory; a path out of it is refused (it may be "
                "another model's file). Fix the index's weight_map.")
        missing = [s for s in shards if not (index.parent / s).is_file()]
        if missing:
            raise MergeInputError(
                f"{where} names shard file '{missing[0]}'"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f" that does not exist in '{index.parent}'. The download is incomplete: fetch "
                f"the missing shards."
            )
        headers = {s: read_header(index.parent / s, label)[0] for s in shards}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise MergeInputError(
                    f"{where} maps tensor '{name}' to '{index.parent / shard}', but that file "
                    f"has no such tensor. The index and shards come from different versions: "
                    f"re-download them together."
                )
        # Only what the index lists is part of the model, as in Hugging Face's loaders.
        tensors = {
            name: info
            for shard in shards
            for name, info in headers[shard].items()
            if weight_map.get(name) == shard
        }
        return cls(path, label, tensors, [index.parent / s for s in shards])

    @property
    def paths(self) -> list[Path]:
        """The checkpoints it reads (one; a sliced view, lines_fast/slices.py, has several)."""
        return [self.path]

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeInputError(
                f"Checkpoint '{self.label}' ({self.path}) has no tensor '{name}'. Check that "
                f"all models share one architecture."
            ) from None

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only view of the tensor's bytes in the file's memory map.

        The view keeps the map alive, even past close(). A tensor whose offset is not a
        multiple of its element size (files written without header padding, e.g. by MLX) is
        returned as an aligned copy instead, so kernels never see misaligned memory.
        """
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype.torch)
        self._check_unchanged(info.file)
        raw = self._file_bytes(info.file)[info.offset:info.offset + info.nbytes]
        if info.offset % info.dtype.itemsize:
            raw = raw.clone()
        return raw.view(info.dtype.torch).view(info.shape)

    def raw_view(self, name: str) -> memoryview:
        """The tensor's bytes as stored (little-endian, row-major), a read-only view of the memory
        map made without torch: what a copy of the tensor writes."""
        info = self.info(name)
        if not info.nbytes:
            return memoryview(b"")
        self._check_unchanged(info.file)
        return memoryview(self._map(info.file))[info.offset:info.offset + info.nbytes]

    def _span(self, names: list[str]) -> tuple[TensorInfo, int] | None:
        """(the first's info, the end offset) of tensors stored back to back in this order in one
        file with one dtype; None if they are not."""
        first = self.tensors.get(names[0])
        if first is None:
            return None
        end = first.offset
        for name in names:
            info = self.tensors.get(name)
            # `is` first: one header's entries share its Path object (Path == costs ~1 us)
            if (info is None or info.offset != end or (info.file is not first.file and info.file != first.file)
                    or info.dtype != first.dtype):
                return None
            end += info.nbytes
        return first, end

    def flat_span(self, names: list[str]) -> torch.Tensor | None:
        """Tensors `names`, stored back to back in this order in one file with one dtype, as one
        flat read-only view of their bytes (one check of the file); None if they are not."""
        span = self._span(names)
        if span is None or span[1] == span[0].offset or span[0].offset % span[0].dtype.itemsize:
            return None
        first, end = span
        self._check_unchanged(first.file)
        return self._file_bytes(first.file)[first.offset:end].view(first.dtype.torch)

    def _file_bytes(self, file: Path) -> torch.Tensor:
        """The whole mapped file as one read-only uint8 tensor, made once per file: a tensor is a
        slice of it (one frombuffer per tensor cost more than a 64-element merge)."""
        whole = self._bytes.get(file)
        if whole is None:
            with warnings.catch_warnings():
                # frombuffer warns that the buffer is not writable: read-only is the point.
                warnings.simplefilter("ignore", UserWarning)
                whole = self._bytes[file] = torch.frombuffer(self._map(file), dtype=torch.uint8)
        return whole

    def _check_unchanged(self, file: Path) -> None:
        then = self._identity.get(file)
        if then is not None:
            try:   # the common case first: one stat of a path string (a Path costs twice that)
                st = os.stat(self._path_strings.get(file) or os.fspath(file))
                if st.st_size == then[0] and st.st_mtime_ns == then[1]:
                    return
            except OSError:
                pass
        now = _identity(file)
        if then is not None and now != then:
            what = ("was removed" if now is None else f"is now {now[0]} bytes, was {then[0]}" if now[0] != then[0]
                    else "was modified")
            raise MergeInputError(
                f"'{file}' of {self.label} changed while lines_fast was reading it (it {what}); the merge "
                "stops and publishes nothing. Rerun once the file is complete and stable (with --resume to "
                "keep the finished shards).")

    def prefetch(self, name: str) -> None:
        """Asks the kernel to start reading the tensor's pages now (MADV_WILLNEED); a hint only."""
        self._advise(name, "MADV_WILLNEED")

    def release(self, name: str) -> None:
        """Unmaps the tensor's pages from this process (MADV_DONTNEED) once it is merged.

        Safe even while views exist: the mapping is shared and read-only, so a later access
        just faults the pages back in from the page cache or the file. What it buys is a
        resident set that stays bounded instead of growing to the size of every input.
        """
        self._advise(name, "MADV_DONTNEED")

    def release_many(self, names: list[str]) -> None:
        """release() of every tensor `names`: one madvise where they are stored back to back."""
        span = self._span(names)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if span is None or advice is None:
            for name in names:
                if name in self.tensors:
                    self.release(name)
            return
        first, end = span
        start = first.offset - first.offset % mmap.PAGESIZE
        try:
            self._map(first.file).madvise(advice, start, end - start)
        except OSError:
            pass

    def release_range(self, name: str, start: int, end: int) -> None:
        """Unmaps the whole pages holding elements start..end of the tensor (MADV_DONTNEED): a
        pass that has read them lets them go at once instead of at the tensor's end."""
        info = self.info(name)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or info.nbytes == 0:
            return
        size = info.dtype.itemsize
        lo = -(-(info.offset + start * size) // mmap.PAGESIZE) * mmap.PAGESIZE   # pages wholly inside
        hi = (info.offset + end * size) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            try:
                self._map(info.file).madvise(advice, lo, hi - lo)
            except OSError:
                pass

    def _advise(self, name: str, advice_name: str) -> None:
        info = self.info(name)
        advice = getattr(mmap, advice_name, None)
        if advice is None or info.nbytes == 0:
            return
        mm = self._map(info.file)
        start = info.offset - info.offset % mmap.PAGESIZE  # madvise needs a page-aligned start
        try:
            mm.madvise(advice, start, info.offset + info.nbytes - start)
        except OSError:
            pass

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:  # the map keeps its own descriptor
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                # Merges read each tensor front to back once: aggressive read-ahead, early reuse.
                try:
                    mm.madvise(mmap.MADV_SEQUENTIAL)
                except OSError:
                    pass
            self._maps[file] = mm
        return mm

    def aux_files(self) -> list[Path]:
        """Config, tokenizer and similar non-weight files of a directory checkpoint, by name."""
        if self.path.is_dir():
            return aux_files_in(self.path)
        if self.path.name.endswith(".index.json"):
            return aux_files_in(self.path.parent)
        return []  # a lone .safetensors file: its neighbours need not belong to it

    def close(self) -> None:
        """Drops the maps. Never munmaps directly: views still alive keep their map (and
        unmapping under them would crash), so each map goes when its last view does."""
        self._maps.clear()
        self._bytes.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.tensors)} tensors in {len(self.files)} files)"


def aux_files_in(folder: Path) -> list[Path]:
    """A folder's config, tokenizer and similar non-weight files (AUX_PATTERNS), by name."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file()
        and not p.name.endswith((".safetensors", ".index.json", ".bin"))
        and any(fnmatch.fnmatchcase(p.name, pat) for pat in AUX_PATTERNS)
    )


def shard_name_is_inside(name) -> bool:
    """An index's shard names a file within the model's directory (not absolute, no '..')."""
    return isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _identity(file: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _only_safetensors(folder: Path, label: str) -> Path:
    """The one .safetensors file of a directory without model.safetensors or an index."""
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found[0]
    where = f"Checkpoint '{label}'" + ("" if label == str(folder) else f" ('{folder}')")
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise MergeInputError(
            f"{where}: the directory holds {len(found)} .safetensors files ({names}) but no "
            f"{INDEX_FILE}, so which of them form the model is unclear. Add the index file "
            f"or point at a single .safetensors file."
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise MergeInputError(
            f"{where}: the directory has no .safetensors weights and no pytorch_model.bin (or its index), "
            f"only PyTorch pickles named otherwise ({', '.join(pickles[:3])}). Point at the file itself, or "
            f"convert them to safetensors (e.g. transformers' save_pretrained(dir, safe_serialization=True))."
        )
    raise MergeInputError(
        f"{where}: the directory has no weights: no .safetensors ({SINGLE_FILE} or {INDEX_FILE}) and no "
        f"pytorch_model.bin (or its index). Point at a model directory, a .safetensors or .bin file, or a PEFT "
        f"adapter directory (adapter_config.json)."
    )
