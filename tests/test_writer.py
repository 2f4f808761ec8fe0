"""The streaming writer: exact output, sharding, atomic publication, crash and resume."""
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lines_fast.checkpoint import Checkpoint
from lines_fast.errors import MergeInputError
from lines_fast.writer import JOURNAL, PARTIAL_SUFFIX, ShardedWriter, check_output_dir, parse_size, plan_shards

REPO = Path(__file__).resolve().parents[1]


def sample():
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(40, 8, generator=g).bfloat16(),
        "layers.0.w": torch.randn(30, 10, generator=g),
        "layers.0.b": torch.randn(3, generator=g).half(),
        "layers.0.mask": torch.rand(7, generator=g) > 0.5,
        "layers.1.w": torch.randn(30, 10, generator=g),
        "layers.1.idx": torch.arange(5),
        "layers.1.scale": torch.tensor(0.5, dtype=torch.float64),
        "layers.1.empty": torch.zeros(0, 3),
        "head.weight": torch.randn(50, 8, generator=g).bfloat16(),
    }


def entries_of(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def write_some(writer, tensors, count=None):
    for name in writer.pending_names()[:count]:
        writer.write(name, tensors[name])


def write_all(out, tensors, max_shard_size=1000, metadata=None, **kw):
    w = ShardedWriter(out, entries_of(tensors), max_shard_size=max_shard_size, metadata=metadata or {}, **kw)
    write_some(w, tensors)
    return w.finish()


def same_bits(a, b):
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_sharded(tmp_path):
    tensors = sample()
    out = write_all(tmp_path / "out", tensors, max_shard_size=1000, metadata={"lines_fast.plan": "abc"})
    assert out == tmp_path / "out"
    assert not (tmp_path / "out.lines-fast-partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    n = len(shard_files)
    assert n > 2 and shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(shard_files + ["model.safetensors.index.json"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    loaded = {}
    for file in shard_files:
        part = load_file(out / file)
        assert all(index["weight_map"][name] == file for name in part)
        loaded.update(part)
        with safe_open(out / file, "pt") as f:
            assert f.metadata() == {"format": "pt", "lines_fast.plan": "abc"}
        header_len = struct.unpack("<Q", (out / file).read_bytes()[:8])[0]
        assert header_len % 8 == 0  # data starts 8-byte aligned
    assert loaded.keys() == tensors.keys()
    for name, ref in tensors.items():
        assert same_bits(loaded[name], ref), name
    # Our own reader sees the same, in output order.
    ckpt = Checkpoint.open(out)
    assert ckpt.names() == list(tensors)
    assert all(same_bits(ckpt.tensor(n), t) for n, t in tensors.items())


def test_sharding_respects_limit():
    sizes = [400, 400, 400, 2500, 100, 1000, 1]
    entries = [(f"t{i}", torch.uint8, (s,)) for i, s in enumerate(sizes)]
    shards = plan_shards(entries, 1000, {"format": "pt"})
    assert [s.names for s in shards] == [("t0", "t1"), ("t2",), ("t3",), ("t4",), ("t5",), ("t6",)]
    for s in shards:
        data = s.size - len(s.header)
        assert data <= 1000 or len(s.names) == 1
    # Everything fits: a single model.safetensors.
    assert [s.file for s in plan_shards(entries, 10**6, {})] == ["model.safetensors"]


def test_single_shard_has_no_index(tmp_path):
    tensors = sample()
    out = write_all(tmp_path / "out", tensors, max_shard_size=10**9)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    loaded = load_file(out / "model.safetensors")
    assert all(same_bits(loaded[n], t) for n, t in tensors.items())


def test_empty_model(tmp_path):
    out = write_all(tmp_path / "out", {}, max_shard_size=10)
    assert load_file(out / "model.safetensors") == {}


def test_published_only_at_finish(tmp_path):
    tensors = sample()
    out = tmp_path / "out"
    w = ShardedWriter(out, entries_of(tensors), max_shard_size=1000, metadata={})
    write_some(w, tensors)
    assert not out.exists() and (tmp_path / "out.lines-fast-partial").is_dir()
    (tmp_path / "config.json").write_text('{"a": 1}')
    w.finish([tmp_path / "config.json"], {"README.md": "merged"})
    assert not (tmp_path / "out.lines-fast-partial").exists()
    assert (out / "config.json").read_text() == '{"a": 1}' and (out / "README.md").read_text() == "merged"
    assert not (out / JOURNAL).exists()


def test_write_checks(tmp_path):
    tensors = sample()
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={})
    with pytest.raises(ValueError, match="expected 'embed.weight'"):
        w.write("layers.0.w", tensors["layers.0.w"])
    with pytest.raises(ValueError, match="plan says"):
        w.write("embed.weight", tensors["embed.weight"].float())
    with pytest.raises(ValueError, match="plan says"):
        w.write("embed.weight", tensors["embed.weight"].reshape(8, 40))
    with pytest.raises(ValueError, match="contiguous"):
        w.write("embed.weight", tensors["embed.weight"].t().contiguous().t())
    with pytest.raises(ValueError, match="unwritten"):
        w.finish()
    w.abort()
    assert not (tmp_path / "out").exists()


def test_write_piece_matches_write(tmp_path):
    tensors = sample()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000))
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={})
    for name in w.pending_names():
        flat = tensors[name].reshape(-1)
        if flat.numel() == 0:
            w.write_piece(name, flat)  # an empty tensor takes one empty piece
        for start in range(0, flat.numel(), 7):  # pieces that end mid-row
            w.write_piece(name, flat[start : start + 7])
    w.finish()
    assert files_of(tmp_path / "out") == reference


def test_write_run_matches_write_across_shards(tmp_path):
    """A run of same-dtype tensors written from one flat tensor: the files write() gives, also
    where the run crosses shard boundaries (40 float32 tensors of 30 elements, 1000-byte shards)."""
    g = torch.Generator().manual_seed(3)
    tensors = {"embed": torch.randn(5, generator=g).half()}
    tensors.update({f"layers.{i}.w": torch.randn(3, 10, generator=g) for i in range(40)})
    tensors["tail"] = torch.randn(2, generator=g).half()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000))
    assert len(reference) > 4   # several shards, so the run crosses boundaries
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={})
    w.write("embed", tensors["embed"])
    names = [f"layers.{i}.w" for i in range(40)]
    w.write_run(names[:25], torch.cat([tensors[n].reshape(-1) for n in names[:25]]))
    w.write_run(names[25:], torch.cat([tensors[n].reshape(-1) for n in names[25:]]))
    assert w.pending_names() == ["tail"]
    w.write("tail", tensors["tail"])
    w.finish()
    assert files_of(tmp_path / "out") == reference


def test_write_run_checks_before_writing(tmp_path):
    tensors = sample()
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={})
    w.write("embed.weight", tensors["embed.weight"])
    run = ["layers.0.w", "layers.0.b"]   # float32 then float16: not one dtype
    with pytest.raises(ValueError, match="plan says torch.float16"):
        w.write_run(run, torch.zeros(303))
    with pytest.raises(ValueError, match="expected 'layers.0.w'"):
        w.write_run(["layers.1.w"], torch.zeros(300))
    with pytest.raises(ValueError, match="299 elements given for 1 tensors of 300"):
        w.write_run(["layers.0.w"], torch.zeros(299))
    assert w.pending_names()[0] == "layers.0.w"   # nothing was written by the refused calls
    w.write_run(["layers.0.w"], tensors["layers.0.w"].reshape(-1))
    assert w.pending_names()[0] == "layers.0.b"
    w.abort()


def test_write_piece_checks(tmp_path):
    tensors = sample()
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={})
    embed = tensors["embed.weight"].reshape(-1)  # 320 elements
    with pytest.raises(ValueError, match="plan says"):
        w.write_piece("embed.weight", embed[:10].float())
    with pytest.raises(ValueError, match="past its 320 elements"):
        w.write_piece("embed.weight", torch.cat([embed, embed[:1]]))
    with pytest.raises(ValueError, match="contiguous"):
        w.write_piece("embed.weight", embed[::2])
    w.write_piece("embed.weight", embed[:100])
    assert w.pending_names()[0] == "embed.weight"
    with pytest.raises(ValueError, match="write_piece"):
        w.write("embed.weight", tensors["embed.weight"])
    with pytest.raises(ValueError, match="expected 'embed.weight'"):
        w.write_piece("layers.0.w", tensors["layers.0.w"].reshape(-1))
    with pytest.raises(ValueError, match="past its 320 elements"):
        w.write_piece("embed.weight", embed[:300])
    w.write_piece("embed.weight", embed[100:])
    assert w.pending_names()[0] == "layers.0.w"
    w.abort()


def test_durable_false_skips_only_fsync(tmp_path, monkeypatch):
    tensors = sample()
    aux = tmp_path / "config.json"
    aux.write_text('{"a": 1}')
    calls = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    results = {}
    for durable in (True, False):
        out = tmp_path / f"out-{durable}"
        out.mkdir()
        (out / "old.txt").write_text("old")
        calls.clear()
        w = ShardedWriter(out, entries_of(tensors), max_shard_size=1000, metadata={}, overwrite=True, durable=durable)
        write_some(w, tensors)
        w.finish([aux], {"README.md": "merged"})
        results[durable] = files_of(out), len(calls)
    assert results[True][1] > 0 and results[False][1] == 0
    assert results[True][0] == results[False][0]
    assert "old.txt" not in results[False][0] and "README.md" in results[False][0]


def test_early_writeback_covers_each_shard_in_order(tmp_path, monkeypatch):
    """A durable shard hands its bytes to the disk in consecutive ranges, each of at least
    WRITEBACK_STEP bytes, as they are written; never for durable=False; the files are the same."""
    import lines_fast.writer as writer_module
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}   # 400 bytes each
    calls = []

    def recording(fd, offset, nbytes, flags):
        calls.append((os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd, offset, nbytes, flags))
        return 0

    monkeypatch.setattr(writer_module, "_start_writeback", recording)
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", 1000)
    results = {}
    for durable in (True, False):
        calls.clear()
        out = write_all(tmp_path / f"out-{durable}", tensors, max_shard_size=2500, durable=durable)
        results[durable] = files_of(out), list(calls)
    assert results[True][0] == results[False][0]
    assert results[False][1] == []
    by_file = {}
    for file, offset, nbytes, flags in results[True][1]:
        assert flags == 2 and nbytes >= 1000   # SYNC_FILE_RANGE_WRITE: start, do not wait
        by_file.setdefault(file, []).append((offset, nbytes))
    shards = sorted(p for p in results[True][0] if p.endswith(".safetensors"))
    assert len(shards) == 2 and len(by_file) == 2   # 6 + 4 tensors: each shard gets its own ranges
    for ranges in by_file.values():
        assert ranges[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))   # no gap, no overlap


def test_early_writeback_for_real(tmp_path, monkeypatch):
    """The OS call itself (Linux has it), at a small step: the output reads back the same."""
    import lines_fast.writer as writer_module
    if sys.platform.startswith("linux"):
        assert writer_module._start_writeback is not None
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", 1000)
    tensors = sample()
    out = write_all(tmp_path / "out", tensors, max_shard_size=1 << 20)
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == tensors.keys() and all(same_bits(loaded[n], t) for n, t in tensors.items())


def interrupted(tmp_path, tensors, count, **kw):
    """Writes the first `count` tensors, then stops as a crash would."""
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={"m": "1"}, **kw)
    write_some(w, tensors, count)
    w.abort()
    return w


def resume_and_finish(tmp_path, tensors, **kw):
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={"m": "1"}, resume=True, **kw)
    pending = w.pending_names()
    write_some(w, tensors)
    w.finish()
    return pending


@pytest.mark.parametrize("durable", [True, False])  # the journal does not depend on fsync
def test_resume_is_byte_identical(tmp_path, durable):
    tensors = sample()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000, metadata={"m": "1"}))
    first = interrupted(tmp_path, tensors, 6, durable=durable)  # four shards done, the fifth half written
    done = json.loads((first.partial / JOURNAL).read_text())["done"]
    finished = [s for s in first.shards if s.file in done]
    assert finished and len(finished) < len(first.shards)
    assert not (tmp_path / "out").exists()

    pending = resume_and_finish(tmp_path, tensors, durable=durable)
    skipped = [n for s in finished for n in s.names]
    assert pending == [n for n in tensors if n not in skipped]
    assert files_of(tmp_path / "out") == reference


def test_notes_survive_an_interruption(tmp_path):
    tensors = sample()
    assert ShardedWriter.read_notes(tmp_path / "out") is None  # no partial output at all
    notes = {"merge": "abc", "stats": {"alpha": (0.1).hex()}}
    interrupted(tmp_path, tensors, 6, notes=notes)
    assert ShardedWriter.read_notes(tmp_path / "out") == notes
    (tmp_path / ("out" + PARTIAL_SUFFIX) / JOURNAL).write_text("{not json")
    assert ShardedWriter.read_notes(tmp_path / "out") is None


def test_resume_rewrites_corrupted_shard(tmp_path):
    tensors = sample()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000, metadata={"m": "1"}))
    first = interrupted(tmp_path, tensors, 6)
    shard = first.partial / first.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    pending = resume_and_finish(tmp_path, tensors)
    assert pending[: len(first.shards[0].names)] == list(first.shards[0].names)
    assert files_of(tmp_path / "out") == reference


def test_resume_refuses_another_plan(tmp_path):
    tensors = sample()
    interrupted(tmp_path, tensors, 5)
    with pytest.raises(MergeInputError) as e:
        ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=2000, metadata={"m": "1"}, resume=True)
    assert "--resume" in str(e.value) and "out.lines-fast-partial" in str(e.value)
    with pytest.raises(MergeInputError):
        ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=1000, metadata={"m": "2"}, resume=True)
    # Without resume, the partial output is discarded and everything is written afresh.
    w = ShardedWriter(tmp_path / "out", entries_of(tensors), max_shard_size=2000, metadata={"m": "1"})
    assert w.pending_names() == list(tensors)
    assert sorted(p.name for p in w.partial.iterdir()) == [JOURNAL]


def test_resume_without_partial_starts_fresh(tmp_path):
    tensors = sample()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000, metadata={"m": "1"}))
    assert resume_and_finish(tmp_path, tensors) == list(tensors)
    assert files_of(tmp_path / "out") == reference


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    from lines_fast import writer as wmod
    from tests.test_writer import entries_of, sample
    tensors = sample()
    w = wmod.ShardedWriter({out!r}, entries_of(tensors), max_shard_size=1000, metadata={{"m": "1"}})
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if {where!r} == "publish":
        wmod.os.rename = kill
    for i, name in enumerate(w.pending_names()):
        if {where!r} == "mid-shard" and i >= 3 and w._file is not None:
            w._file.flush()  # half a shard on disk, as a crash mid-write leaves it
            kill()
        w.write(name, tensors[name])
    w.finish()
    """
)


@pytest.mark.parametrize("where", ["mid-shard", "publish"])
def test_kill_9_then_resume(tmp_path, where):
    tensors = sample()
    reference = files_of(write_all(tmp_path / "ref", tensors, max_shard_size=1000, metadata={"m": "1"}))
    script = CRASH_SCRIPT.format(repo=str(REPO), out=str(tmp_path / "out"), where=where)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not (tmp_path / "out").exists()
    resume_and_finish(tmp_path, tensors)
    assert files_of(tmp_path / "out") == reference


def test_overwrite_replaces_only_at_finish(tmp_path):
    tensors = sample()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    w = ShardedWriter(out, entries_of(tensors), max_shard_size=1000, metadata={}, overwrite=True)
    write_some(w, tensors)
    assert (out / "old.txt").exists()  # the old output survives until the new one is complete
    w.finish()
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out.lines-fast-old").exists()

    # Without overwrite, an output directory that appeared meanwhile is never replaced.
    w = ShardedWriter(out, entries_of(tensors), max_shard_size=1000, metadata={})
    write_some(w, tensors)
    with pytest.raises(MergeInputError, match="--resume"):
        w.finish()
    assert (out / "model.safetensors.index.json").exists() and w.partial.exists()


def test_check_output_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    check_output_dir(tmp_path / "merged", [model], force=False)
    (tmp_path / "merged").mkdir()
    with pytest.raises(MergeInputError, match="--force"):
        check_output_dir(tmp_path / "merged", [model], force=False)
    with pytest.raises(MergeInputError, match="nothing to resume"):
        check_output_dir(tmp_path / "merged", [model], force=False, resume=True)
    check_output_dir(tmp_path / "merged", [model], force=True)
    with pytest.raises(MergeInputError, match="inside the input"):
        check_output_dir(model / "merged", [model], force=False)
    with pytest.raises(MergeInputError, match="contains the input"):
        check_output_dir(tmp_path, [model], force=True)
    with pytest.raises(MergeInputError, match="contains the input"):
        check_output_dir(model, [model], force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeInputError, match="not a directory"):
        check_output_dir(tmp_path / "file", [model], force=True)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1000", 1000), (123, 123), ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("5G", 5 * 10**9),
        ("500MB", 500 * 10**6), ("2 KB", 2000), ("1.5GB", 1_500_000_000), ("2KiB", 2048),
        ("3MiB", 3 * 2**20), ("1GiB", 2**30), ("1TB", 10**12), ("1tib", 2**40),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", "5 G B", "5B", "1e9"])
def test_parse_size_errors(text):
    with pytest.raises(MergeInputError):
        parse_size(text)
