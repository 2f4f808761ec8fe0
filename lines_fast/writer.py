"""Streaming, crash-safe, resumable output of a checkpoint in Hugging Face layout.

The whole layout is planned before the first byte is written: the output tensors' names,
dtypes and shapes fix every shard's contents, header and size. Each shard's header is
written first and tensor bytes go straight to their offsets as the merge produces them, so
no shard is ever held in memory (mergekit's peak memory grows with the shard size).

Everything is written into `<out_dir>.lines-fast-partial` and renamed to `out_dir` only once
complete and fsynced (unless durable=False), so a crash at any moment leaves either no
`out_dir` or a complete one.
A journal in the partial directory records each finished shard's size and CRC-32; a run with
`resume=True` keeps the shards that still verify and rewrites the rest. Because the layout
is a pure function of the plan, the result is byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .lazy import torch

from . import dtypes
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .dtypes import DType
from .distributed import World
from .errors import MergeInputError, OutputWriteError

PARTIAL_SUFFIX = ".lines-fast-partial"
OLD_SUFFIX = ".lines-fast-old"
JOURNAL = "lines-fast-journal.json"
# A distributed merge: rank r > 0 journals its own shards here (rank 0 keeps JOURNAL).
RANK_JOURNAL = "lines-fast-journal-rank{rank}.json"
_RANK_JOURNALS = re.compile(r"lines-fast-journal-rank\d+\.json")
# Bumped whenever the bytes written for a given plan change, so old partial output is
# never mixed with new.
LAYOUT_VERSION = 1

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in "5GB", "500MB", "2GiB", "1.5G" or "1000000"; K/M/G/T are decimal, KiB.. binary."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if m and unit == "b":
            # mergekit's --out-shard-size 5B means five billion bytes; Hugging Face's "5B"
            # would be five bytes. Guessing either way silently makes absurd shards.
            raise MergeInputError(
                f"Size '{text}' is ambiguous: mergekit reads the B suffix as billions of bytes, "
                f"others as bytes. Write e.g. {m.group(1)}GB for {m.group(1)} billion bytes, "
                f"or a plain number of bytes."
            )
        unit = unit[:-1] if unit.endswith("b") else unit
        mult = _DECIMAL.get(unit) or _BINARY.get(unit)
        if m is None or mult is None:
            raise MergeInputError(
                f"Cannot read '{text}' as a size. Use a number of bytes or a number with a unit: "
                f"KB, MB, GB, TB (powers of 1000, K/M/G/T alike) or KiB, MiB, GiB, TiB (powers of 1024)."
            )
        value = int(Fraction(m.group(1)) * mult)
    if value <= 0:
        raise MergeInputError(f"Size '{text}' must be at least one byte.")
    return value


@dataclass(frozen=True)
class Shard:
    """One planned output file: its name, tensors in order, header bytes and total size."""

    file: str
    names: tuple[str, ...]
    header: bytes
    size: int


def group_by_size(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """The entries (indices, in order) of each shard: a new shard starts where the next tensor
    would take the current one past max_shard_size bytes (plan_shards; `lines-fast plan`)."""
    groups: list[list[int]] = [[]]
    filled = 0
    for i, nbytes in enumerate(sizes):
        if groups[-1] and filled + nbytes > max_shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += nbytes
    return groups


def plan_shards(
    entries: list[tuple[str, DType, tuple[int, ...]]], max_shard_size: int, metadata: dict[str, str]
) -> list[Shard]:
    """Fills shards greedily in entry order, as mergekit and Hugging Face do (dtypes: DType or torch's).

    A new shard starts when the next tensor would take the current one's tensor bytes past
    max_shard_size; a tensor larger than the limit gets a shard of its own.
    """
    sizes = [dtype.itemsize * math.prod(shape) for _, dtype, shape in entries]
    groups = [[(entries[i][0], dtypes.of(entries[i][1]).code, list(entries[i][2]), sizes[i]) for i in group]
              for group in group_by_size(sizes, max_shard_size)]
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        header: dict = {"__metadata__": metadata}
        begin = 0
        for name, dtype_name, shape, nbytes in group:
            header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [begin, begin + nbytes]}
            begin += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        raw += b" " * (-len(raw) % 8)
        file = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        head = len(raw).to_bytes(8, "little") + raw
        shards.append(Shard(file, tuple(e[0] for e in group), head, len(head) + begin))
    return shards


LOCK_SUFFIX = ".lines-fast-lock"


def sibling(out_dir: str | os.PathLike, suffix: str) -> Path:
    """OUT's partial (PARTIAL_SUFFIX), set-aside (OLD_SUFFIX) or lock (LOCK_SUFFIX) path."""
    out = Path(os.path.abspath(out_dir))
    return out.with_name(out.name + suffix)


def made_by_lines_fast(folder: Path) -> bool:
    """Whether `folder` holds only what lines_fast wrote: empty, or its weights carry lines_fast's
    metadata (a merge's lines_fast_version, a synthetic model's lines_fast_synthetic). lines_fast
    deletes or replaces a directory only when this holds."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    entries = list(folder.iterdir())
    if not entries:
        return True
    weights = sorted(p for p in entries if p.name.endswith(".safetensors") and p.is_file())
    if not weights:
        return False
    # Only the header's __metadata__ is read, not checked against the data: a damaged file of
    # ours (truncated, say) is still ours to replace.
    try:
        with open(weights[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= 1 << 27 else {}
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and any(str(key).startswith("lines_fast_") for key in metadata)


def check_output_dir(out_dir: str | os.PathLike, inputs: list[Path], force: bool, resume: bool = False) -> None:
    """Refuses an output directory that exists (unless force, and then only one lines_fast wrote)
    or whose path, partial or set-aside sibling is, holds or lies inside an input.

    inputs: every path the merge reads (checkpoint directories and files, the tokenizer source);
    symlinks are resolved, so a file that links into OUT counts as inside OUT. resume changes
    nothing here, only the message: the partial output lives next to out_dir, so an existing
    out_dir is a finished merge, not something to resume.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"The output path '{out_dir}' exists and is not a directory. Remove it or choose another output path.")
    if out.exists() and not force:
        raise MergeInputError(
            f"The output directory '{out_dir}' already exists"
            + (" (a finished merge: there is nothing to resume)" if resume else "")
            + ". Choose another path, or pass --force to replace it (the old one is removed "
            "only once the new one is complete)."
        )
    ours = {"output directory": out, "partial output directory": sibling(out, PARTIAL_SUFFIX).resolve(),
            "set-aside directory": sibling(out, OLD_SUFFIX).resolve()}
    for given in inputs:
        inp = Path(given).resolve()
        for what, path in ours.items():
            if inp == path or path in inp.parents:
                link = "" if Path(os.path.abspath(given)) == inp else f" (it resolves to '{inp}')"
                raise MergeInputError(
                    f"The {what} '{path}' contains the input '{given}'{link}; writing there would replace "
                    f"the input. Choose an output path outside every input.")
        if inp.is_dir() and inp in out.parents:
            raise MergeInputError(
                f"The output directory '{out_dir}' lies inside the input directory '{given}'. "
                f"Choose an output path outside every input directory."
            )
    if out.exists() and not made_by_lines_fast(out):
        raise MergeInputError(
            f"The output directory '{out_dir}' exists and was not written by lines_fast (its weights carry no "
            "lines_fast metadata), so --force will not replace it: lines_fast never deletes what it did not "
            "write. Remove it yourself, or choose another output path.")


class OutputLock:
    """An exclusive lock on OUT for a whole run (fcntl.flock on OUT.lines-fast-lock), so two
    merges into one OUT cannot interleave: the second is refused while the first lives. The
    lock file is removed on release; a lock of a dead process is free (the kernel drops it)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = sibling(out_dir, LOCK_SUFFIX)
        self.out_dir = Path(out_dir)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                    os.close(fd)
                    raise MergeInputError(
                        f"Another lines-fast run (pid {owner}) is writing '{self.out_dir}' now (it holds "
                        f"'{self.path}'). Wait for it to finish, or choose another output path.") from None
                # The holder before us may have removed the file after we opened it: lock the
                # file that is at the path now, or try again.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise MergeInputError(f"Cannot create the output lock '{self.path}': {e.strerror or e}. Check that "
                                  "the output location is writable.") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)   # while still holding it: a waiter re-checks the inode
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes, sync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# Early writeback: a durable shard asks the OS to start writing each WRITEBACK_STEP bytes to
# disk as soon as they are written (Linux sync_file_range, which does not wait), so the disk
# works while the merge computes and the fsync at the shard's end has little left to wait for:
# on llama-336m, fsync 0.25 s -> 0.013 s (a 5 GB shard of a 70B merge would wait ~2 s each).
# Then the output leaves the page cache: each step drops the range handed to the disk a step
# earlier (clean by then: POSIX_FADV_DONTNEED skips pages still dirty or under writeback), and
# the shard's close drops the rest after its fsync. The merge never reads its output back, and
# a page it frees is the next write's page: otherwise each new page must come from fresh memory
# (on this VM, guest pages never touched before, each first touch slow; elsewhere, pages
# reclaimed from a full page cache, the inputs' among them). Writing 673 MB into fresh memory:
# 2.0-2.7 s without, 0.7-1.0 s with (this VM, 3 runs each).
WRITEBACK_STEP = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback_function():
    if not sys.platform.startswith("linux"):   # a Linux call (and CDLL(None) fails on Windows)
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_start_writeback = _start_writeback_function()
_POSIX_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def _drop_cached(fd: int, offset: int, length: int) -> None:
    """Drops the clean pages of fd's bytes offset..offset+length (0: to the end) from the page
    cache; a hint, ignored where it does not exist or fails."""
    if _POSIX_FADV_DONTNEED is not None:
        try:
            os.posix_fadvise(fd, offset, length, _POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (and without needing numpy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def different_merge_error(partial: Path) -> MergeInputError:
    return MergeInputError(
        f"The partial output '{partial}' was written for a different merge (other models, changed model "
        f"files, parameters, tensors, shard size or metadata), so it cannot be resumed. Rerun without "
        f"--resume, or delete '{partial}'.")


class ShardedWriter:
    """Writes planned shards tensor by tensor, then publishes the directory atomically.

    Call write() for each name of pending_names(), in that order, then finish(); or hand a
    tensor over in consecutive flat pieces with write_piece(), so that a producer never holds
    more than a piece of it. A crash, an exception or abort() leaves the partial directory
    for a later resume=True run and never creates out_dir. With overwrite=True (the CLI's --force) an existing out_dir is
    replaced at finish: renamed aside, the new one renamed in, then the old one deleted, so
    a crash never loses both.

    Resume trusts the plan hash: metadata (or resume_key, hashed but not written) should
    carry a digest of everything that decides the tensor values (models, method, parameters),
    so a changed merge never reuses shards.

    notes: JSON-able facts the caller wants back on resume (read_notes), kept in the journal;
    the engine keeps there what its statistics passes found, so a resume can skip them.

    durable=False skips every fsync (of shards, journal, index, aux and extra files and
    directories) and changes nothing else: same files, same journal, same atomic renames. The
    output is then safe against a crash of this process but not against a power loss or an OS
    crash. Meant for data that can be regenerated (synthetic checkpoints), where fsync would
    make writing disk-bound.

    world / owners (a distributed merge, lines_fast/distributed.py): this writer writes only
    the shards owners[i] == world.rank assigns it, into the one partial directory all ranks
    share; rank 0 prepares that directory (verifying every rank's journal on resume) and
    publishes it once every rank's finish() has reported its shards done. Every rank must call
    the constructor and finish(): both exchange with the other ranks.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        entries: list[tuple[str, DType, tuple[int, ...]]],   # or torch dtypes
        *,
        max_shard_size: int,
        metadata: dict[str, str],
        resume: bool = False,
        overwrite: bool = False,
        resume_key: str = "",
        durable: bool = True,
        notes: dict | None = None,
        world: World | None = None,
        owners: list[int] | None = None,
    ):
        if max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("shard metadata must map strings to strings")
        names = [e[0] for e in entries]
        if len(set(names)) != len(names) or "__metadata__" in names:
            raise ValueError("output tensor names must be unique and not '__metadata__'")
        for name, dtype, shape in entries:
            if dtypes.BY_NAME.get(str(dtype).removeprefix("torch.")) is None or any(
                    type(d) is not int or d < 0 for d in shape):
                raise ValueError(f"cannot write tensor {name!r}: dtype {dtype}, shape {shape}")
        entries = [(name, dtypes.of(dtype), tuple(shape)) for name, dtype, shape in entries]

        self.out_dir = Path(os.path.abspath(out_dir))
        self.partial = self.out_dir.with_name(self.out_dir.name + PARTIAL_SUFFIX)
        self.overwrite = overwrite
        self.durable = durable
        self.metadata = {"format": "pt", **metadata}
        self.shards = plan_shards(entries, max_shard_size, self.metadata)
        self._entries = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        plan = [LAYOUT_VERSION, max_shard_size, self.metadata, [[n, d.code, list(s)] for n, d, s in entries]]
        if resume_key:  # what else decides the values but is not written (e.g. the inputs' identity)
            plan.append(resume_key)
        self.plan_hash = hashlib.sha256(json.dumps(plan, ensure_ascii=False).encode("utf-8")).hexdigest()

        self.notes = notes
        self.world = world or World()
        self.owners = owners if owners is not None else [0] * len(self.shards)
        if len(self.owners) != len(self.shards) or not all(0 <= o < self.world.size for o in self.owners):
            raise ValueError(f"owners must give a rank in 0..{self.world.size - 1} for each of {len(self.shards)} shards")
        self.journal = JOURNAL if self.world.is_root else RANK_JOURNAL.format(rank=self.world.rank)
        self._done: dict[str, dict[str, int]] = {}  # shard file -> {"size", "crc32"}
        if self.world.is_root:
            self._prepare(resume)
        self._done = self.world.exchange(self._done)[0]   # rank 0's verified shards
        if not self.world.is_root:
            self._save_journal()
        mine = {s.file for s, owner in zip(self.shards, self.owners) if owner == self.world.rank}
        self._mine = [s for s in self.shards if s.file in mine]
        self._pending = [(i, name) for i, s in enumerate(self.shards)
                         if s.file in mine and s.file not in self._done for name in s.names]
        self._pos = 0
        self._piece_elems = 0  # elements of the current tensor written so far by write_piece
        self._file = None
        self._crc = 0
        self._written_back = 0   # the current shard's bytes handed to the disk (early writeback)
        self._dropped = 0        # ... and those of them dropped from the page cache
        self._state = "open"
        self._check_space()

    def _prepare(self, resume: bool) -> None:
        """Makes the partial directory: a fresh one, or on resume the old one less every file
        that does not verify against a journal."""
        try:
            aside = sibling(self.out_dir, OLD_SUFFIX)
            if aside.exists() or aside.is_symlink():
                raise MergeInputError(
                    f"'{aside}' exists: an earlier publish of '{self.out_dir}' was interrupted between its two "
                    "renames, and it may hold the previous output. Check it, move or remove it, then rerun.")
            if self.partial.exists() or self.partial.is_symlink():
                if not self._partial_is_ours():
                    raise MergeInputError(
                        f"'{self.partial}' exists but holds no lines_fast journal, so this run did not leave it "
                        "there (or it is a publish cut short); lines_fast never deletes what it did not write. "
                        "Move it away or remove it yourself, then rerun.")
                if resume:
                    self._verify_journal()
                else:
                    _remove(self.partial)
            self.partial.mkdir(parents=True, exist_ok=True)
            # Anything not verified (a half-written shard, a copied config) is rewritten.
            # Other ranks' journals are folded into this one (their shards were verified above).
            for p in self.partial.iterdir():
                if p.name not in self._done and p.name != JOURNAL:
                    _remove(p)
            self._save_journal()
        except OSError as e:
            raise MergeInputError(
                f"Cannot create the output's temporary directory '{self.partial}': "
                f"{e.strerror or e}. Check that the output location is writable."
            ) from e

    def _partial_is_ours(self) -> bool:
        """A partial directory this writer may reuse or delete: a directory (not a link) that is
        empty or holds lines_fast's journal."""
        p = self.partial
        return p.is_dir() and not p.is_symlink() and (not any(p.iterdir()) or (p / JOURNAL).is_file())

    @staticmethod
    def read_notes(out_dir: str | os.PathLike) -> dict | None:
        """The notes journaled by an interrupted writer of out_dir, or None (no usable journal)."""
        partial = Path(os.path.abspath(out_dir))
        partial = partial.with_name(partial.name + PARTIAL_SUFFIX)
        try:
            notes = json.loads((partial / JOURNAL).read_text(encoding="utf-8")).get("notes")
        except (OSError, ValueError, AttributeError):
            return None
        return notes if isinstance(notes, dict) else None

    def _verify_journal(self) -> None:
        """Keeps the journals' shards whose size and CRC-32 still match (every rank's journal, so a
        resume may use another world size); refuses another plan."""
        done: dict = {}
        for path in sorted(self.partial.iterdir()):
            if path.name != JOURNAL and not _RANK_JOURNALS.fullmatch(path.name):
                continue
            try:
                journal = json.loads(path.read_text(encoding="utf-8"))
                plan, found = journal["plan"], dict(journal["done"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no usable journal: nothing it lists is known complete, so rewrite it
            if plan != self.plan_hash:
                raise different_merge_error(self.partial)
            done.update(found)
        files = {s.file: s for s in self.shards}
        for file, record in done.items():
            path = self.partial / file
            if (
                file in files
                and isinstance(record, dict)
                and record.get("size") == files[file].size
                and path.is_file()
                and path.stat().st_size == record["size"]
                and _file_crc32(path) == record.get("crc32")
            ):
                self._done[file] = {"size": record["size"], "crc32": record["crc32"]}

    def _save_journal(self) -> None:
        # Write-then-rename, so the journal is always either the old or the new version.
        tmp = self.partial / (self.journal + ".tmp")
        record = {"plan": self.plan_hash, "done": self._done}
        if self.notes is not None:
            record["notes"] = self.notes
        journal = json.dumps(record, indent=1).encode("utf-8")
        _write_synced(tmp, journal, self.durable)
        os.replace(tmp, self.partial / self.journal)
        self._sync_dir(self.partial)

    def _sync_dir(self, path: Path) -> None:
        if self.durable:
            _fsync_dir(path)

    def _check_space(self) -> None:
        needed = sum(s.size for s in self._mine if s.file not in self._done)
        try:
            free = shutil.disk_usage(self.partial).free
        except OSError:
            return
        if free < needed:
            raise MergeInputError(
                f"The output needs {needed / 1e9:.2f} GB more but only {free / 1e9:.2f} GB are "
                f"free at '{self.partial.parent}'. Free some space or choose another output path."
            )

    @property
    def done_shards(self) -> set[str]:
        """The shard files verified complete (on resume, by any rank's journal)."""
        return set(self._done)

    def pending_names(self) -> list[str]:
        """The names still to write, in the order write() must receive them."""
        return [name for _, name in self._pending[self._pos :]]

    def _next(self, name: str, ahead: int = 0) -> tuple[int, DType, tuple[int, ...]]:
        """The shard index, dtype and shape of the next pending tensor (`ahead` after it), which
        must be `name`."""
        if self._state != "open":
            raise ValueError(f"cannot write {name!r}: the writer is {self._state}")
        if self._pos + ahead >= len(self._pending):
            raise ValueError(f"cannot write {name!r}: every pending tensor has been written")
        index, expected = self._pending[self._pos + ahead]
        if name != expected:
            raise ValueError(f"tensors must be written in plan order: expected {expected!r}, got {name!r}")
        return (index, *self._entries[name])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next pending tensor (CPU or device) to its shard."""
        index, dtype, shape = self._next(name)
        if self._piece_elems:
            raise ValueError(f"tensor {name!r} is partly written: write the rest with write_piece")
        if tensor.dtype != dtype.torch or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the plan says {dtype.torch} {shape}"
            )
        self._append(name, index, tensor, math.prod(shape))

    def write_run(self, names: list[str], flat: torch.Tensor) -> None:
        """Appends the next len(names) pending tensors from `flat`: their elements end to end, in
        one contiguous tensor of their planned dtype. The same bytes as write() for each, in one
        write per shard: what makes a pack of 10^4 small tensors cheap."""
        if self._piece_elems:
            raise ValueError(f"tensor {self._pending[self._pos][1]!r} is partly written: write the rest with write_piece")
        runs: list[tuple[int, int, int]] = []   # (shard index, tensors, elements), checked before any write
        for ahead, name in enumerate(names):
            index, dtype, shape = self._next(name, ahead)
            if dtype.torch != flat.dtype:
                raise ValueError(f"tensor {name!r} is {flat.dtype}, the plan says {dtype.torch}")
            if runs and runs[-1][0] == index:
                runs[-1] = (index, runs[-1][1] + 1, runs[-1][2] + math.prod(shape))
            else:
                runs.append((index, 1, math.prod(shape)))
        if sum(elements for _, _, elements in runs) != flat.numel():
            raise ValueError(f"{flat.numel()} elements given for {len(names)} tensors of "
                             f"{sum(elements for _, _, elements in runs)}")
        flat = flat.reshape(-1)
        at = 0
        for index, tensors, elements in runs:
            self._append(names[0], index, flat[at:at + elements], elements, tensors)
            at += elements

    def write_piece(self, name: str, piece: torch.Tensor) -> None:
        """Appends the next piece of the pending tensor `name`: a contiguous tensor (any shape)
        of its planned dtype holding the elements, in row-major order, that follow those
        written before. The tensor is complete once its pieces add up to its planned number of
        elements; pending_names() moves on then. A tensor without elements takes one empty piece.
        """
        index, dtype, shape = self._next(name)
        total = math.prod(shape)
        if piece.dtype != dtype.torch:
            raise ValueError(f"a piece of tensor {name!r} is {piece.dtype}, the plan says {dtype.torch}")
        if self._piece_elems + piece.numel() > total:
            raise ValueError(
                f"a piece of {piece.numel()} elements would take tensor {name!r} past its "
                f"{total} elements ({self._piece_elems} written)"
            )
        self._append(name, index, piece, total)

    def write_bytes(self, name: str, data: memoryview) -> None:
        """Appends the next pending tensor as its stored bytes (its planned dtype, little-endian,
        row-major): a copy of an input's tensor, straight from its memory map, without torch."""
        index, dtype, shape = self._next(name)
        if self._piece_elems:
            raise ValueError(f"tensor {name!r} is partly written: write the rest with write_piece")
        if data.nbytes != dtype.itemsize * math.prod(shape):
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes given, the plan's {dtype} {shape} needs "
                             f"{dtype.itemsize * math.prod(shape)}")
        self._append_data(index, data, math.prod(shape), math.prod(shape))

    def _append(self, name: str, index: int, tensor: torch.Tensor, total: int, tensors: int = 1) -> None:
        """Writes the tensor's bytes to the shard; total: elements the current tensor has in all
        (or, with tensors > 1, the elements of that many whole tensors that `tensor` holds)."""
        if not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous")
        tensor = tensor.cpu()
        self._append_data(index, tensor, tensor.numel(), total, tensors)

    def _append_data(self, index: int, data, elements: int, total: int, tensors: int = 1) -> None:
        """data: the bytes of `elements` elements, or a contiguous CPU tensor of them."""
        shard = self.shards[index]
        try:
            if self._file is None:
                self._file = open(self.partial / shard.file, "wb")
                self._file.write(shard.header)
                self._crc = zlib.crc32(shard.header)
                self._written_back = self._dropped = 0
            if elements:
                if not isinstance(data, memoryview):
                    data = _tensor_bytes(data)
                self._file.write(data)
                self._crc = zlib.crc32(data, self._crc)
                self._write_back()
            self._piece_elems += elements
            if self._piece_elems == total:
                self._piece_elems = 0
                self._pos += tensors
                if self._pos == len(self._pending) or self._pending[self._pos][0] != index:
                    self._close_shard(shard)
        except OSError as e:
            self.abort()
            raise OutputWriteError(
                f"Writing '{self.partial / shard.file}' failed: {e.strerror or e}. Free some space "
                f"or fix the output location, then rerun with --resume to keep finished shards."
            ) from e

    def _write_back(self) -> None:
        """Each WRITEBACK_STEP: starts the disk writing the current shard's bytes up to here, and
        drops from the page cache the range handed to it the step before."""
        if not self.durable or _start_writeback is None:
            return
        end = self._file.tell()
        if end - self._written_back < WRITEBACK_STEP:
            return
        self._file.flush()
        fd = self._file.fileno()
        # A failure here only loses the head start: the fsync at the shard's end still decides.
        _start_writeback(fd, self._written_back, end - self._written_back, _SYNC_FILE_RANGE_WRITE)
        if self._written_back > self._dropped:   # the step before: on disk by now
            _drop_cached(fd, self._dropped, self._written_back - self._dropped)
        self._dropped, self._written_back = self._written_back, end

    def _close_shard(self, shard: Shard) -> None:
        if self._file is None:  # a shard without tensors (an empty model)
            _write_synced(self.partial / shard.file, shard.header, self.durable)
            self._crc = zlib.crc32(shard.header)
        else:
            self._file.flush()
            if self.durable:
                os.fsync(self._file.fileno())
                _drop_cached(self._file.fileno(), 0, 0)   # all on disk now (see WRITEBACK_STEP)
            size = self._file.tell()
            self._file.close()
            self._file = None
            if size != shard.size:
                raise RuntimeError(f"{shard.file}: wrote {size} bytes, planned {shard.size}")
        self._done[shard.file] = {"size": shard.size, "crc32": self._crc}
        self._save_journal()

    def finish(self, aux_files: list[Path] = (), extra_files: dict[str, bytes] | None = None) -> Path:
        """Writes the index, copies aux_files, writes extra_files (name -> bytes, e.g. an
        updated config.json; they win over aux files of the same name), and publishes."""
        if self._state != "open":
            raise ValueError(f"cannot finish: the writer is {self._state}")
        if self._pos != len(self._pending):
            raise ValueError(f"cannot finish: {len(self._pending) - self._pos} tensors unwritten, next {self._pending[self._pos][1]!r}")
        extra = {name: data.encode("utf-8") if isinstance(data, str) else data for name, data in (extra_files or {}).items()}
        ours = {s.file for s in self.shards} | {INDEX_FILE, JOURNAL}
        clash = ours & ({Path(p).name for p in aux_files} | set(extra))
        if clash:
            raise ValueError(f"extra output files would replace the weights or index: {sorted(clash)}")
        try:
            for shard in self._mine:
                if shard.file not in self._done:
                    self._close_shard(shard)   # a shard without tensors
        except OSError as e:
            self.abort()
            raise OutputWriteError(f"Writing '{self.partial}' failed: {e.strerror or e}. Fix the output location, "
                                  "then rerun with --resume to keep finished shards.") from e
        self.world.phase = "publishing the output"
        for done in self.world.exchange(self._done):
            self._done.update(done)
        if not self.world.is_root:
            self.world.exchange(None)   # rank 0 has published (or its failure is raised here)
            self._state = "finished"
            return self.out_dir
        unwritten = [s.file for s in self.shards if s.file not in self._done]
        if unwritten:
            raise RuntimeError(f"no rank wrote {unwritten}")
        if (self.out_dir.exists() or self.out_dir.is_symlink()) and not self.overwrite:
            self.abort()
            raise MergeInputError(
                f"The output directory '{self.out_dir}' appeared while merging. Move it away, "
                f"or rerun with --force; add --resume to keep the finished shards in "
                f"'{self.partial}'."
            )
        try:
            if len(self.shards) > 1:
                total = sum(s.size - len(s.header) for s in self.shards)
                weight_map = {name: s.file for s in self.shards for name in s.names}
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                # Hugging Face writes the index with indent=2 and sorted keys.
                text = json.dumps(index, indent=2, sort_keys=True) + "\n"
                _write_synced(self.partial / INDEX_FILE, text.encode(), self.durable)
            for src in aux_files:
                if Path(src).name not in extra:
                    dst = self.partial / Path(src).name
                    shutil.copyfile(src, dst)
                    if self.durable:
                        with open(dst, "rb+") as f:
                            os.fsync(f.fileno())
            for name, data in extra.items():
                _write_synced(self.partial / name, data, self.durable)
            # The journal stays until the directory is published: a crash before the rename below
            # leaves a partial directory that is recognisably ours and resumable.
            self._sync_dir(self.partial)

            aside = None
            if self.out_dir.exists() or self.out_dir.is_symlink():
                aside = sibling(self.out_dir, OLD_SUFFIX)   # absent: checked at the start
                os.rename(self.out_dir, aside)
            os.rename(self.partial, self.out_dir)
            for p in self.out_dir.iterdir():
                if p.name == JOURNAL or _RANK_JOURNALS.fullmatch(p.name):
                    p.unlink()
            self._sync_dir(self.out_dir)
            self._sync_dir(self.out_dir.parent)
            if aside is not None:
                _remove(aside)
        except OSError as e:
            self.abort()
            raise OutputWriteError(
                f"Finishing the output in '{self.partial}' failed: {e.strerror or e}. Fix the "
                f"output location, then rerun with --resume to keep finished shards."
            ) from e
        self._state = "finished"
        self.world.exchange(None)   # the other ranks wait for the publish
        return self.out_dir

    def abort(self) -> None:
        """Stops writing; the partial directory stays for a resume=True run."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._state == "open":
            self._state = "aborted"

    def discard(self) -> None:
        """abort(), and where no shard is finished, remove the partial directory too: a merge
        refused for its inputs leaves nothing behind (a resume of it would be another merge), and
        a partial with finished shards stays for --resume. (Distributed ranks share the
        directory: there it always stays.) A failed write is an abort(): its journal keeps the
        statistics for --resume."""
        self.abort()
        if not self._done and self.world.size == 1:
            try:
                _remove(self.partial)
            except OSError:
                pass

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._state == "open":
            self.abort()
