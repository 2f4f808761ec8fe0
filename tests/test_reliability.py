"""Crash safety, resume and determinism of whole merges, end to end.

A killed merge (a real SIGKILL) leaves no OUT_DIR, and --resume then gives the very bytes of
an uninterrupted run; a resume with other options or other input files is refused. Same
inputs, options and seed give byte-identical output whatever the chunk size, thread count
and the order or sharding of the models' tensors.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lines_fast.engine as engine
from lines_fast import cli
from lines_fast.backends.cpu import DEFAULT_CHUNK, CpuBackend
from lines_fast.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from lines_fast.errors import NonFiniteInput
from lines_fast.synth import Recipe, recipe, write_checkpoint_family
from lines_fast.writer import JOURNAL, OLD_SUFFIX, PARTIAL_SUFFIX

from helpers import load, write_safetensors

REPO = Path(__file__).resolve().parents[1]
# Big enough that torch splits its ops over threads (tensors of 131072 elements); about
# 3 MB per model in bf16.
SMALL = Recipe("small", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)
Q1 = "model.layers.1.self_attn.q_proj.weight"
LAST_FLOAT = "lm_head.weight"


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def save_sharded(folder, shards):
    """Replace the weights of an HF directory by the given shards ({name: tensor} each) + index."""
    folder = Path(folder)
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    if (folder / INDEX_FILE).exists():
        (folder / INDEX_FILE).unlink()
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, tensors)
        weight_map.update({name: file for name in tensors})
    if len(shards) == 1:
        os.rename(folder / file, folder / SINGLE_FILE)
    else:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def run(capsys, *args):
    capsys.readouterr()
    rc = cli.main(["merge", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def merge_ok(capsys, *args):
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    return err


def error_line(err):
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("lines-fast merge: error: ") and "Traceback" not in err, err
    return last


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_checkpoint_family(root, recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16, int_tensor=True)


@pytest.fixture
def own_family(family, tmp_path):
    """A private copy of the family, to edit."""
    shutil.copytree(family.base.parent, tmp_path / "models")
    return type(family)(tmp_path / "models" / "base", [tmp_path / "models" / f.name for f in family.finetunes])


def args_for(family, out, method="ties", *extra):
    a = ["--method", method, "--base", family.base]
    for m in family.finetunes:
        a += ["--model", m]
    return [*a, "-o", out, "--no-progress", "--max-shard-size", "20KB", *extra]


TIES_LINES = ("ties", "--density", "0.3", "--lines-beta", "0.5")  # two passes: norms, then merge


# -- kill -9 and resume -------------------------------------------------------------------
# The merge is slowed (each tensor write sleeps) so that the kill lands mid-way for sure.
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import lines_fast.writer as writer
    write = writer.ShardedWriter.write
    def slow_write(self, name, tensor):
        time.sleep(0.03)
        return write(self, name, tensor)
    writer.ShardedWriter.write = slow_write
    from lines_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def kill_mid_merge(args, partial):
    """Start the merge in a subprocess and SIGKILL it once a shard is journaled as finished."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the merge ended before it could be killed: " + proc.stderr.read().decode()
            try:
                done = json.loads((partial / JOURNAL).read_text())["done"]
            except (OSError, ValueError, KeyError):
                done = {}
            if done:
                proc.kill()  # SIGKILL: no handler, no cleanup
                break
            time.sleep(0.005)
        else:
            pytest.fail("no shard was finished within 60 s")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -9
    return done


def test_kill_9_then_resume_is_byte_identical(family, tmp_path, capsys):
    ref = tmp_path / "ref"
    merge_ok(capsys, *args_for(family, ref, *TIES_LINES))
    shards = [f for f in files_of(ref) if f.endswith(".safetensors")]
    assert len(shards) >= 4 and INDEX_FILE in files_of(ref)

    out = tmp_path / "out"
    partial = Path(str(out) + PARTIAL_SUFFIX)
    done = kill_mid_merge(args_for(family, out, *TIES_LINES), partial)
    assert not out.exists()
    assert partial.is_dir() and (partial / JOURNAL).is_file()
    assert 1 <= len(done) < len(shards)

    # A resume of another merge is refused, and keeps the partial output.
    for changed in (["--density", "0.4", "--lines-beta", "0.5"], ["--density", "0.3", "--lines-beta", "0.6"],
                    ["--density", "0.3", "--lines-beta", "0.5", "--out-dtype", "float32"]):
        rc, _, err = run(capsys, *args_for(family, out, "ties", *changed), "--resume")
        assert rc == 2
        assert "different merge" in error_line(err) and str(partial) in err
        assert "(norms) took" not in err  # refused before the statistics pass, not after it
        assert not out.exists() and (partial / JOURNAL).is_file()
    rc, _, err = run(capsys, *args_for(family, out, *TIES_LINES), "--resume", "--max-shard-size", "2MB")
    assert rc == 2 and "different merge" in error_line(err)

    # So is a resume over input files that changed since (here: a model file was rewritten).
    model_file = family.finetunes[1] / SINGLE_FILE
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        rc, _, err = run(capsys, *args_for(family, out, *TIES_LINES), "--resume")
        assert rc == 2 and "different merge" in error_line(err)
    finally:
        os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not out.exists() and (partial / JOURNAL).is_file()

    err = merge_ok(capsys, *args_for(family, out, *TIES_LINES), "--resume")
    # α auto was journaled: the resume skips the norms pass and reuses it (the bytes below prove it exact).
    assert "--resume: reusing the α of the interrupted run; statistics pass(es) norms skipped" in err
    assert "(norms) took" not in err
    line = next(l for l in err.splitlines() if l.startswith("--resume:") and "already written" in l)
    kept = int(line.split()[1])
    assert kept > 0, line
    assert not partial.exists()
    assert files_of(out) == files_of(ref)


def test_resume_of_a_global_merge_reuses_its_thresholds_and_alpha(family, tmp_path, capsys):
    """Global TIES + LiNeS auto: 3-4 statistics passes. A resume journaled their results and
    skips them all, and still writes the very bytes of an uninterrupted run."""
    args = ("ties", "--density", "0.3", "--trim-scope", "global", "--lines-beta", "0.5")
    ref = tmp_path / "ref"
    err = merge_ok(capsys, *args_for(family, ref, *args))
    assert "(magnitudes) took" in err and "(norms) took" in err
    out = tmp_path / "out"
    kill_mid_merge(args_for(family, out, *args), Path(str(out) + PARTIAL_SUFFIX))
    err = merge_ok(capsys, *args_for(family, out, *args), "--resume")
    assert "reusing the α and global thresholds of the interrupted run" in err
    assert "(magnitudes) took" not in err and "(norms) took" not in err
    assert files_of(out) == files_of(ref)


def poison(model_dir, name: str, index, value: float) -> None:
    """Rewrite a model's single file with one element of one tensor set to `value`."""
    tensors = load(model_dir)
    tensors[name][index] = value
    save_sharded(model_dir, [tensors])


def test_failure_mid_merge_leaves_only_partial_output(own_family, tmp_path, capsys, monkeypatch):
    """Bad data found late (NaN in the last float tensor) stops the merge: no OUT_DIR."""
    fam = own_family
    ft2 = fam.finetunes[1]
    poison(ft2, LAST_FLOAT, (1, 2), float("nan"))

    out = tmp_path / "out"
    partial = Path(str(out) + PARTIAL_SUFFIX)
    rc, _, err = run(capsys, *args_for(fam, out, "ties", "--density", "0.3"))
    assert rc == 2
    line = error_line(err)
    assert LAST_FLOAT in line and "model 2" in line and str(ft2 / SINGLE_FILE) in line
    assert not out.exists()
    assert json.loads((partial / JOURNAL).read_text())["done"]  # shards before it were finished

    # The old OUT_DIR (an earlier lines_fast output) survives a failed --force run; a finished
    # one replaces it.
    shutil.copytree(fam.base, out)
    (out / "old.txt").write_text("previous merge")
    rc, _, err = run(capsys, *args_for(fam, out, "ties", "--density", "0.3"), "--force")
    assert rc == 2 and (out / "old.txt").read_text() == "previous merge"

    # Resuming needs room only for what is left: the finished shards are already on disk.
    with Checkpoint.open(fam.base) as ckpt:
        total = ckpt.total_bytes()  # the output's tensor bytes too: same tensors, same dtypes
    done = sum(len(b) for f, b in files_of(partial).items() if f.endswith(".safetensors"))
    free = (64 << 20) + int(1.02 * (total - done)) + 4096
    assert free < (64 << 20) + 1.02 * total  # too little for the whole output
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    rc, _, err = run(capsys, *args_for(fam, tmp_path / "elsewhere", "ties", "--density", "0.3"))
    assert rc == 2 and "free disk" in error_line(err)
    err = merge_ok(capsys, *args_for(fam, out, "ties", "--density", "0.3"), "--force", "--resume",
                   "--allow-nonfinite")
    monkeypatch.undo()
    assert not (out / "old.txt").exists() and torch.isnan(load(out)[LAST_FLOAT].float()).any()
    assert not partial.exists() and not Path(str(out) + OLD_SUFFIX).exists()
    ref = tmp_path / "ref"
    merge_ok(capsys, *args_for(fam, ref, "ties", "--density", "0.3"), "--allow-nonfinite")
    assert files_of(out) == files_of(ref)


def test_resume_without_partial_output_starts_fresh(family, tmp_path, capsys):
    out = tmp_path / "out"
    err = merge_ok(capsys, *args_for(family, out, "task_arithmetic"), "--resume")
    assert "--resume: 0 of" in err
    ref = tmp_path / "ref"
    merge_ok(capsys, *args_for(family, ref, "task_arithmetic"))
    assert files_of(out) == files_of(ref)


# -- determinism --------------------------------------------------------------------------
DETERMINISM_CASES = {
    "ties+lines": TIES_LINES,
    "ties-global+lines": ("ties", "--density", "0.3", "--trim-scope", "global", "--lines-beta", "0.5"),
    "dare_ties": ("dare_ties", "--density", "0.4", "--seed", "1234"),
}


def with_chunk(monkeypatch, chunk):
    monkeypatch.setattr(engine, "make_backend", lambda device, allow_nonfinite=False, log=None, local_rank=None:
                        CpuBackend(chunk=chunk, check_finite=not allow_nonfinite))


@pytest.fixture(scope="module")
def reference_outputs(family, tmp_path_factory):
    """Each determinism case merged once with the default backend."""
    root = tmp_path_factory.mktemp("refs")
    outputs = {}
    for name, case in DETERMINISM_CASES.items():
        out = root / name
        assert cli.main(["merge", *map(str, args_for(family, out, *case)), "-q"]) == 0
        outputs[name] = files_of(out)
    return outputs


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_same_run_twice_is_bitwise_identical(family, reference_outputs, tmp_path, capsys, case):
    merge_ok(capsys, *args_for(family, tmp_path / "again", *DETERMINISM_CASES[case]))
    assert files_of(tmp_path / "again") == reference_outputs[case]


@pytest.mark.parametrize("chunk", [1000, 4099])
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_chunk_size_does_not_change_a_bit(family, reference_outputs, tmp_path, capsys, monkeypatch, case, chunk):
    assert chunk < DEFAULT_CHUNK
    with_chunk(monkeypatch, chunk)
    merge_ok(capsys, *args_for(family, tmp_path / "out", *DETERMINISM_CASES[case]))
    assert files_of(tmp_path / "out") == reference_outputs[case]


def test_dare_seed_decides_the_masks(family, reference_outputs, tmp_path, capsys):
    case = list(DETERMINISM_CASES["dare_ties"])
    case[case.index("--seed") + 1] = "1235"
    merge_ok(capsys, *args_for(family, tmp_path / "other", *case))
    other, ref = files_of(tmp_path / "other"), reference_outputs["dare_ties"]
    assert other.keys() == ref.keys()
    assert other != ref


THREADS = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from lines_fast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_thread_count_does_not_change_a_bit(tmp_path):
    """With tensors big enough for torch to split its ops over threads (131072 elements)."""
    family = write_checkpoint_family(tmp_path / "small", SMALL, n_finetunes=2, dtype=torch.bfloat16)
    case = [*DETERMINISM_CASES["ties-global+lines"], "--max-shard-size", "1MB"]
    procs = {}
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}"
        procs[threads] = (out, subprocess.Popen(
            [sys.executable, "-c", THREADS, str(threads), "merge", *map(str, args_for(family, out, *case)), "-q"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for threads, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        results[threads] = files_of(out)
    assert len([f for f in results[1] if f.endswith(".safetensors")]) > 1
    assert results[1] == results[2]


def test_tensor_order_and_sharding_of_models_do_not_matter(own_family, tmp_path, capsys):
    """A model whose tensors are stored in another order and sharding gives the same bytes;
    the output's order follows the base."""
    fam = own_family
    refs = {}
    for case in ("ties+lines", "dare_ties"):
        refs[case] = tmp_path / f"ref-{case}"
        merge_ok(capsys, *args_for(fam, refs[case], *DETERMINISM_CASES[case]))
    ft1, ft2 = fam.finetunes
    tensors = load(ft1)
    names = list(tensors)[::-1]
    save_sharded(ft1, [{n: tensors[n] for n in names[i::3]} for i in range(3)])
    tensors = load(ft2)
    save_sharded(ft2, [{n: tensors[n] for n in sorted(tensors)}])
    for model in (ft1, ft2):
        with Checkpoint.open(model) as ckpt:
            assert list(ckpt.tensors) != list(tensors)
    for case in ("ties+lines", "dare_ties"):
        out = tmp_path / f"out-{case}"
        merge_ok(capsys, *args_for(fam, out, *DETERMINISM_CASES[case]))
        assert files_of(out) == files_of(refs[case])

    # Reorder the base itself: the values are the same, the order is the base's.
    tensors = load(fam.base)
    order = sorted(tensors, key=lambda n: (n.count("mlp"), n))
    save_sharded(fam.base, [{n: tensors[n] for n in order[:9]}, {n: tensors[n] for n in order[9:]}])
    out = tmp_path / "reordered-base"
    merge_ok(capsys, *args_for(fam, out, *DETERMINISM_CASES["dare_ties"]))
    got = load(out)
    assert list(got) == order
    want = load(refs["dare_ties"])
    for name in order:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


# -- a backend that does not know which input held the NaN --------------------------------
class VagueBackend(CpuBackend):
    """Reports NaN/Inf from the magnitude histograms without a tensor name or model index,
    as a backend working on bare tensors may."""

    def magnitude_histograms(self, base, models):
        if not all(torch.isfinite(t).all() for t in [base, *models]):
            raise NonFiniteInput("", 0)
        return super().magnitude_histograms(base, models)


@pytest.mark.parametrize("poisoned", ["model.embed_tokens.weight", Q1])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_nonfinite_is_traced_to_its_file(own_family, tmp_path, capsys, monkeypatch, poisoned, scope):
    monkeypatch.setattr(engine, "make_backend", lambda device, allow_nonfinite=False, log=None, local_rank=None: VagueBackend())
    fam = own_family
    ft2 = fam.finetunes[1]
    poison(ft2, poisoned, (0, 3), float("inf"))
    out = tmp_path / "out"
    rc, _, err = run(capsys, *args_for(fam, out, "ties", "--density", "0.3", "--trim-scope", scope))
    assert rc == 2
    line = error_line(err)
    assert f"tensor '{poisoned}' of model 2" in line and str(ft2 / SINGLE_FILE) in line
    assert not out.exists()
