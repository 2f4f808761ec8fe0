"""Nothing lost, whatever the user does: one merge per output at a time, and no deletion of
anything lines_fast did not write (inputs, tokenizer sources, link targets, a real model where
a synthetic one would go, directories that only look like lines_fast's own)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lines_fast import cli
from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.writer import LOCK_SUFFIX, OLD_SUFFIX, PARTIAL_SUFFIX, OutputLock

from helpers import write_safetensors

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_checkpoint_family(tmp_path_factory.mktemp("safety") / "fam", recipe("tiny"), n_finetunes=2,
                                   dtype=torch.bfloat16)


@pytest.fixture
def fam(tmp_path, pristine):
    for src, name in ((pristine.base, "base"), (pristine.finetunes[0], "ft1"), (pristine.finetunes[1], "ft2")):
        shutil.copytree(src, tmp_path / name)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (links followed), for 'untouched' checks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def merge_args(root: Path, out: Path, *extra) -> list[str]:
    return ["merge", "--method", "task_arithmetic", "--base", str(root / "base"), "--model", str(root / "ft1"),
            "--model", str(root / "ft2"), "-o", str(out), "--no-progress", "--device", "cpu", *map(str, extra)]


def refused(capsys, *argv) -> str:
    capsys.readouterr()
    rc = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# -- 1. one merge per output --------------------------------------------------------------
def test_a_second_merge_into_a_locked_output_is_refused_and_touches_nothing(fam, capsys):
    out = fam / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom lines_fast.writer import OutputLock, ShardedWriter\n"
         f"with OutputLock({str(out)!r}):\n"
         "    import torch\n"
         f"    w = ShardedWriter({str(out)!r}, [('a', torch.float32, (2,))], max_shard_size=1 << 20, metadata={{}})\n"
         "    print('locked', flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        partial = Path(str(out) + PARTIAL_SUFFIX)
        before = snapshot(partial)
        for extra in ((), ("--force",), ("--resume",)):
            msg = refused(capsys, *merge_args(fam, out, *extra))
            assert f"pid {holder.pid}" in msg and str(out) in msg
        assert snapshot(partial) == before and not out.exists()
    finally:
        holder.communicate("", timeout=30)
    assert not Path(str(out) + LOCK_SUFFIX).exists()   # released and removed by its holder


def test_racing_merges_never_publish_a_broken_output(fam, tmp_path):
    """Two real lines-fast processes started together into one OUT (with --force): each either
    finishes or is refused by the lock, and OUT always ends up the complete merge."""
    reference = fam / "ref"
    assert cli.main(merge_args(fam, reference)) == 0
    want = snapshot(reference)
    exe = shutil.which("lines-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "lines_fast.cli"]
    outcomes = set()
    for trial in range(4):
        out = tmp_path / f"race{trial}"
        procs = [subprocess.Popen(cmd + merge_args(fam, out, "--force", "-q"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for rc, err in results:
            assert rc == 0 or (rc == 2 and "Another lines-fast run" in err), err
        outcomes.add(tuple(sorted(rc for rc, _ in results)))
        assert snapshot(out) == want
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"race{trial}")) == [f"race{trial}"]
    assert outcomes <= {(0, 0), (0, 2)}


def test_lock_is_free_again_after_its_holder_dies(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import os, signal\nfrom lines_fast.writer import OutputLock\n"
                           f"l = OutputLock({str(out)!r}).__enter__()\nos.kill(os.getpid(), signal.SIGKILL)\n"],
                          cwd=REPO)
    assert proc.returncode == -9 and Path(str(out) + LOCK_SUFFIX).exists()   # left behind, but not held
    with OutputLock(out):
        pass


# -- 2. nothing the merge did not create is deleted ---------------------------------------------
def test_tokenizer_source_that_is_the_output_is_refused(fam, capsys):
    before = snapshot(fam / "ft1")
    msg = refused(capsys, *merge_args(fam, fam / "ft1", "--tokenizer-source", fam / "ft1", "--force"))
    assert "input" in msg and str(fam / "ft1") in msg
    assert snapshot(fam / "ft1") == before


def test_an_input_linking_into_the_output_is_refused(fam, capsys):
    out = fam / "out"
    assert cli.main(merge_args(fam, out)) == 0   # an earlier merge: --force may replace it ...
    linked = fam / "linked"
    linked.mkdir()
    for f in out.iterdir():
        (linked / f.name).symlink_to(f)
    before = snapshot(out)
    args = merge_args(fam, out, "--force")
    args[args.index(str(fam / "base"))] = str(linked)   # ... but not while the base's files are in it
    msg = refused(capsys, *args)
    assert "resolves to" in msg and str(out) in msg
    assert snapshot(out) == before


@pytest.mark.parametrize("suffix", [PARTIAL_SUFFIX, OLD_SUFFIX])
def test_an_input_named_like_the_outputs_siblings_is_refused(fam, capsys, suffix):
    out = fam / "out"
    sibling = Path(str(out) + suffix)
    (fam / "ft2").rename(sibling)
    before = snapshot(sibling)
    args = merge_args(fam, out)
    args[args.index(str(fam / "ft2"))] = str(sibling)
    msg = refused(capsys, *args)
    assert str(sibling) in msg and "input" in msg
    assert snapshot(sibling) == before and not out.exists()


def test_a_stray_partial_or_set_aside_directory_is_never_deleted(fam, capsys):
    out = fam / "out"
    for suffix, words in ((PARTIAL_SUFFIX, "no lines_fast journal"), (OLD_SUFFIX, "interrupted")):
        stray = Path(str(out) + suffix)
        stray.mkdir()
        (stray / "notes.txt").write_text("mine")
        msg = refused(capsys, *merge_args(fam, out))
        assert str(stray) in msg and words in msg
        assert (stray / "notes.txt").read_text() == "mine" and not out.exists()
        shutil.rmtree(stray)


def test_force_never_replaces_a_directory_lines_fast_did_not_write(fam, capsys):
    out = fam / "out"
    out.mkdir()
    write_safetensors(out / "model.safetensors", {"w": torch.ones(3)})   # someone's model
    before = snapshot(out)
    msg = refused(capsys, *merge_args(fam, out, "--force"))
    assert "not written by lines_fast" in msg
    assert snapshot(out) == before


def test_generate_never_deletes_a_real_model(tmp_path, capsys):
    real = tmp_path / "dir" / "base"
    real.mkdir(parents=True)
    write_safetensors(real / "model.safetensors", {"w": torch.ones(3)})
    (real / "config.json").write_text("{}")
    before = snapshot(real)
    capsys.readouterr()
    assert cli.main(["generate", "tiny", str(tmp_path / "dir")]) == 2
    assert "not a model lines_fast wrote" in capsys.readouterr().err
    assert snapshot(real) == before and not (tmp_path / "dir" / "ft1").exists()
    # a synthetic family is regenerated in place
    assert cli.main(["generate", "tiny", str(tmp_path / "gen")]) == 0
    assert cli.main(["generate", "tiny", str(tmp_path / "gen")]) == 0


def test_demo_keep_never_replaces_a_foreign_merged_directory(tmp_path, capsys):
    merged = tmp_path / "keep" / "merged"
    merged.mkdir(parents=True)
    (merged / "mine.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["demo", "--keep", str(tmp_path / "keep"), "--device", "cpu"]) == 2
    assert (merged / "mine.txt").read_text() == "mine"
    assert "not written by lines_fast" in capsys.readouterr().err
