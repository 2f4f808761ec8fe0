"""Distributed merges (torch.distributed, gloo, CPU): ranks started as torchrun starts them
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), one process each, must give the
very bytes of a one-process merge, fail together, and resume."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lines_fast.distributed import World, assign_shards
from lines_fast.engine import merge
from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.writer import JOURNAL, PARTIAL_SUFFIX

WORKER = Path(__file__).with_name("dist_worker.py")
SHARD = "30KB"   # the tiny family's 0.2 MB output in 10 shards, so every rank has several


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return write_checkpoint_family(tmp_path_factory.mktemp("dist") / "fam", recipe("tiny"), n_finetunes=3,
                                   dtype=torch.bfloat16)


def config(fam, method, tmp_path, **top):
    doc = {"merge_method": method, "base_model": str(fam.base),
           "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.4} if method != "task_arithmetic"
                       else {"weight": w}} for p, w in zip(fam.finetunes, (1.0, 0.7, 0.5))],
           **top}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


CASES = {
    "task_arithmetic": ("task_arithmetic", {"parameters": {"lambda": 0.8}}),
    "ties_tensor": ("ties", {}),
    "ties_global": ("ties", {"parameters": {"trim_scope": "global"}}),
    "dare_ties": ("dare_ties", {"parameters": {"seed": 7}}),
    "ties_lines_auto": ("ties", {"lines": {"beta": 1.0}}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, argv_of_rank, env: dict | None = None, timeout: float = 120):
    """Start `world` ranks of `python dist_worker.py <argv>` as torchrun would; wait for all."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LINES_FAST_DIST_TIMEOUT": "60",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *argv_of_rank(rank)], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def merge_args(cfg, out, *extra):
    return ["merge", str(cfg), str(out), "--device", "cpu", "--max-shard-size", SHARD, "--no-progress", *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_process(cfg, out) -> dict[str, bytes]:
    merge(cfg, out, device="cpu", max_shard_size=SHARD, progress=False, log=lambda m: None)
    return files_of(out)


@pytest.mark.parametrize("case", list(CASES))
def test_two_and_three_ranks_write_the_bytes_of_one_process(fam, tmp_path, case):
    method, top = CASES[case]
    cfg = config(fam, method, tmp_path, **top)
    expected = one_process(cfg, tmp_path / "one")
    assert sum(name.endswith(".safetensors") for name in expected) >= 6
    for world in (2, 3):
        out = tmp_path / f"world{world}"
        results = run_ranks(world, lambda rank: merge_args(cfg, out))
        for rank, (rc, stdout, err) in enumerate(results):
            assert rc == 0, f"rank {rank}: {err}"
        # The summary (rank 0 only) names the world and each rank's share.
        assert f"{world} ranks" in results[0][1] and all(f"rank {r} on cpu" in results[0][1] for r in range(world))
        assert results[1][1] == "" and results[1][2] == ""   # the other ranks are quiet
        assert files_of(out) == expected, f"world size {world}"


def test_world_size_one_under_torchrun_is_the_one_process_merge(fam, tmp_path):
    cfg = config(fam, "ties", tmp_path, parameters={"trim_scope": "global"}, lines={"beta": 1.0})
    expected = one_process(cfg, tmp_path / "one")
    [(rc, out, err)] = run_ranks(1, lambda rank: merge_args(cfg, tmp_path / "w1"))
    assert rc == 0, err
    assert files_of(tmp_path / "w1") == expected


def test_a_killed_rank_leaves_no_output_and_resume_completes_it(fam, tmp_path):
    cfg = config(fam, "ties", tmp_path, parameters={"trim_scope": "global"}, lines={"beta": 1.0})
    expected = one_process(cfg, tmp_path / "one")
    out = tmp_path / "out"
    results = run_ranks(2, lambda rank: merge_args(cfg, out), env={"TEST_DIE_RANK": "1"})
    assert results[1][0] == 9                       # killed after its first shard
    rc, _, err = results[0]
    assert rc == 2 and "lost contact with the other ranks" in err and "--resume" in err, err
    assert "Traceback" not in err
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    assert not out.exists() and (partial / JOURNAL).is_file()
    assert (partial / "lines-fast-journal-rank1.json").is_file()   # rank 1 journaled its shard

    # Resume on another world size: every rank's journal counts, the finished shards are kept.
    results = run_ranks(3, lambda rank: merge_args(cfg, out, "--resume"))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}: {err}"
    err = results[0][2]
    assert "--resume: reusing the α and global thresholds of the interrupted run" in err, err
    line = next((l for l in err.splitlines() if l.startswith("--resume:") and "already written" in l), err)
    assert int(line.split()[1]) > 0, err
    assert not partial.exists()
    assert files_of(out) == expected


def test_a_failing_rank_names_itself_and_the_tensor_and_every_rank_stops(fam, tmp_path):
    cfg = config(fam, "ties", tmp_path)
    out = tmp_path / "out"
    results = run_ranks(3, lambda rank: merge_args(cfg, out), env={"TEST_FAIL_RANK": "2"})
    assert [rc for rc, _, _ in results] == [2, 2, 2]
    err0 = results[0][2]
    assert "rank 2 of 3 failed" in err0 and "while merging tensor 'model." in err0, err0
    assert "No space left on device" in err0 and "Traceback" not in err0
    assert "No space left on device" in results[2][2]   # the failing rank says it too
    assert results[1][2] == ""                           # a bystander is quiet
    assert not out.exists()


def test_ranks_started_with_different_merges_are_refused(fam, tmp_path):
    cfg = config(fam, "task_arithmetic", tmp_path, parameters={"lambda": 0.8})
    out = tmp_path / "out"
    results = run_ranks(2, lambda rank: merge_args(cfg, out, *(["--lambda", "0.5"] if rank == 1 else [])))
    assert [rc for rc, _, _ in results] == [2, 2]
    err = results[0][2]
    assert "rank 1 of 2 was started with another merge than rank 0" in err and "the config" in err, err
    assert results[1][2] == ""    # the same message: shown once, by rank 0
    assert not out.exists() and not out.with_name(out.name + PARTIAL_SUFFIX).exists()


def test_torchrun_launches_it(fam, tmp_path):
    """The real launcher, as the README shows it (python -m torch.distributed.run is torchrun)."""
    cfg = config(fam, "ties", tmp_path)
    expected = one_process(cfg, tmp_path / "one")
    out = tmp_path / "tr"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "lines_fast", *merge_args(cfg, out)],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert files_of(out) == expected


def test_plan_prices_the_shares_the_ranks_really_get(fam, tmp_path, capsys):
    import re

    from lines_fast import cli

    cfg = config(fam, "ties", tmp_path)
    results = run_ranks(3, lambda rank: merge_args(cfg, tmp_path / "out"))
    assert all(rc == 0 for rc, _, _ in results), results[0][2]
    ran = re.findall(r"rank (\d) on cpu: (\d+) shard\(s\), (\d+) tensors", results[0][1])
    assert cli.main(["plan", str(cfg), "--world-size", "3", "--max-shard-size", SHARD, "--device", "cpu"]) == 0
    planned = re.findall(r"rank (\d): (\d+) shard\(s\), (\d+) tensors", capsys.readouterr().out)
    assert planned == ran and len(ran) == 3
    assert sum(int(n) for _, n, _ in ran) == 10


def test_shards_are_assigned_largest_first_to_the_least_loaded_rank():
    # By hand, largest first: 9 -> r0; 7 -> r1; 5 -> r2; 4 -> r2 (loads 9, 7, 5); 3 -> r1 (9, 7, 9);
    # 1 -> r0 (loads 9, 10, 9: the tie goes to the lower rank).
    assert assign_shards([5, 9, 1, 7, 4, 3], 3) == [2, 0, 0, 1, 2, 1]
    assert assign_shards([3, 3, 3], 1) == [0, 0, 0]
    assert assign_shards([1], 4) == [0]


def test_world_from_torchrun_environment():
    assert World.from_env({}) == World()
    world = World.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert (world.rank, world.size, world.local_rank, world.is_root) == (2, 4, 0, False)
    from lines_fast.errors import MergeInputError
    with pytest.raises(MergeInputError, match="rank must lie in 0..WORLD_SIZE-1"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
