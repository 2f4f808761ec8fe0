"""`lines-fast merge --workers N`: N local processes (rank 0 the command itself) give the very
bytes of a one-process merge, refuse what they cannot mean, stop together when a worker dies,
and resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.writer import JOURNAL, PARTIAL_SUFFIX

SHARD = "30KB"   # the tiny family's 0.2 MB output in 10 shards, so each worker has several

# Faults for a started worker only (the launcher starts without RANK in its environment):
# the test's code, loaded by Python at start-up from PYTHONPATH, never the package's.
FAULTS = '''
import os
if os.environ.get("RANK") == os.environ.get("TEST_DIE_RANK"):
    if os.environ.get("TEST_DIE_AT") == "start":
        os._exit(9)
    from lines_fast import writer
    close_shard = writer.ShardedWriter._close_shard
    def close_then_die(self, shard):
        close_shard(self, shard)
        os._exit(9)
    writer.ShardedWriter._close_shard = close_then_die
'''


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return write_checkpoint_family(tmp_path_factory.mktemp("workers") / "fam", recipe("tiny"), n_finetunes=3,
                                   dtype=torch.bfloat16)


def config(fam, tmp_path, method="ties", **top) -> Path:
    doc = {"merge_method": method, "base_model": str(fam.base),
           "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.4}}
                      for p, w in zip(fam.finetunes, (1.0, 0.7, 0.5))], **top}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def lines_fast(*argv, env=None, timeout=180):
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "lines_fast", *argv], env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def merge_argv(cfg, out, *extra):
    return ["merge", str(cfg), str(out), "--device", "cpu", "--max-shard-size", SHARD, "--no-progress", *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method, top", [
    ("ties", {"parameters": {"trim_scope": "global"}, "lines": {"beta": 1.0}}),   # global stats + alpha auto
    ("dare_ties", {"parameters": {"seed": 3}}),
])
def test_workers_give_the_bytes_of_one_process(fam, tmp_path, method, top):
    cfg = config(fam, tmp_path, method, **top)
    one = lines_fast(*merge_argv(cfg, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    three = lines_fast(*merge_argv(cfg, tmp_path / "three", "--workers", "3"))
    assert three.returncode == 0, three.stderr
    assert files_of(tmp_path / "three") == files_of(tmp_path / "one")
    # The summary (rank 0's stdout) names every worker's share; the workers' own output is not shown.
    assert "3 ranks" in three.stdout and "rank 2 on cpu" in three.stdout
    assert three.stdout.count("merged ") == 1


@pytest.mark.parametrize("argv, expected", [
    (["--workers", "0"], "--workers 0: give a number of processes of 1 or more"),
    (["--workers", "2", "--device", "cuda"], "workers are CPU processes"),
])
def test_workers_refuse_what_they_cannot_mean(fam, tmp_path, argv, expected):
    result = lines_fast(*merge_argv(config(fam, tmp_path), tmp_path / "out", *argv))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_workers_inside_torchrun_are_refused(fam, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = lines_fast(*merge_argv(config(fam, tmp_path), tmp_path / "out", "--workers", "2"), env=env)
    assert result.returncode == 2 and "inside a torchrun launch" in result.stderr
    assert not (tmp_path / "out").exists()


def faults(tmp_path: Path, rank: int, at: str) -> dict:
    (tmp_path / "faults").mkdir(exist_ok=True)
    (tmp_path / "faults" / "sitecustomize.py").write_text(FAULTS)
    path = os.pathsep.join([str(tmp_path / "faults"), os.environ.get("PYTHONPATH", "")])
    (tmp_path / "tmp").mkdir(exist_ok=True)   # where the launcher keeps its workers' logs
    return {"PYTHONPATH": path, "TEST_DIE_RANK": str(rank), "TEST_DIE_AT": at, "TMPDIR": str(tmp_path / "tmp")}


def test_a_worker_dead_before_joining_stops_the_merge(fam, tmp_path):
    """Rank 0 would wait for it in the process group until the timeout: the launcher sees it gone."""
    out = tmp_path / "out"
    result = lines_fast(*merge_argv(config(fam, tmp_path), out, "--workers", "2"), env=faults(tmp_path, 1, "start"),
                        timeout=90)
    assert result.returncode == 2, result.stderr
    assert "worker rank 1 of 2 exited with status 9" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    assert not list((tmp_path / "tmp").iterdir()), "the workers' log folder is left behind"


def test_a_worker_killed_mid_merge_stops_it_and_resume_finishes_it(fam, tmp_path):
    cfg = config(fam, tmp_path, parameters={"trim_scope": "global"})
    assert lines_fast(*merge_argv(cfg, tmp_path / "one")).returncode == 0
    out = tmp_path / "out"
    killed = lines_fast(*merge_argv(cfg, out, "--workers", "2"), env=faults(tmp_path, 1, "first-shard"), timeout=90)
    assert killed.returncode == 2, killed.stderr
    assert "rank 1" in killed.stderr and "Traceback" not in killed.stderr
    assert not out.exists()
    assert not list((tmp_path / "tmp").iterdir()), "the workers' log folder is left behind"
    partial = Path(f"{out}{PARTIAL_SUFFIX}")
    assert (partial / JOURNAL).exists() or any(partial.glob("lines-fast-journal-rank*.json"))
    resumed = lines_fast(*merge_argv(cfg, out, "--workers", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert files_of(out) == files_of(tmp_path / "one")
