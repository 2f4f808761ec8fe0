"""The `lines-fast bench` machinery on the tiny workload: one method, our engine against the
reference, each as a child process (mergekit is never run here)."""
from __future__ import annotations

import json

import pytest

from lines_fast import benchmark, cli


def test_bench_tiny_against_reference(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["bench", "--workload", "tiny", "--methods", "task_arithmetic", "--devices", "cpu",
            "--compare", "reference", "--repeats", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "lines_fast/cpu" in printed and "reference" in printed and "vs reference" in printed
    [path] = out.glob("e2e-tiny-*.json")
    result = json.loads(path.read_text())

    assert {"platform", "cpu_count", "cpu_model", "ram_bytes"} <= set(result["machine"])
    assert {"python", "torch", "safetensors", "lines_fast"} <= set(result["versions"])
    assert "mergekit" not in result["versions"]
    assert len(result["source"]["sha256"]) == 64 and "changed_during_runs" in result["source"]
    assert result["date"] and result["command"].startswith("lines-fast bench --workload tiny")
    workload = result["workload"]
    assert workload["recipe"] == "tiny" and workload["dtype"] == "bfloat16" and workload["n_finetunes"] == 3
    assert workload["input_bytes"] == 4 * workload["bytes_per_model"] > 0

    # Every run: a child process that succeeded, with its wall time and peak RSS.
    assert sorted(r["tool"] for r in result["runs"]) == ["lines_fast/cpu", "reference"]
    for run in result["runs"]:
        assert run["returncode"] == 0 and run["seconds"] > 0 and run["peak_rss_bytes"] > 10 << 20
        assert run["gpu_peak_reserved"] is None  # no CUDA in these children
    lf_run = next(r for r in result["runs"] if r["tool"] == "lines_fast/cpu")
    assert 0 < lf_run["engine_seconds"] <= lf_run["seconds"]

    rows = {r["tool"]: r for r in result["results"]}
    assert rows["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert rows["lines_fast/cpu"]["input_gbps"] > 0
    assert rows["lines_fast/cpu"]["speedup_vs_mergekit"] is None

    check = result["verification"]["task_arithmetic|lines_fast/cpu"]
    assert check["ok"] and not check["informational"] and check["tensors"] > 0 and check["max_abs_diff"] == 0.0

    # The outputs are removed, the generated inputs kept for the next run.
    assert not (tmp_path / "work" / "outputs").exists()
    assert (tmp_path / "work" / "inputs" / "workload.json").exists()


def test_workload_is_reused_only_when_it_matches(tmp_path):
    first = benchmark.prepare_workload("tiny", tmp_path)
    assert not first.reused and len(first.files) == 4
    again = benchmark.prepare_workload("tiny", tmp_path)
    assert again.reused and again.input_bytes == first.input_bytes
    # A damaged family is regenerated rather than benchmarked.
    first.files[1].write_bytes(first.files[1].read_bytes()[:-8])
    assert not benchmark.prepare_workload("tiny", tmp_path).reused


def test_configs_are_mergekit_yaml(tmp_path):
    import yaml

    workload = benchmark.prepare_workload("tiny", tmp_path)
    configs = benchmark.write_configs(workload, ["ties", "task_arithmetic"], tmp_path / "configs")
    ties = yaml.safe_load(configs["ties"].read_text())
    assert ties["merge_method"] == "ties" and ties["dtype"] == "float32" and ties["out_dtype"] == "bfloat16"
    assert ties["parameters"]["lambda"] == 1.0 and ties["parameters"]["normalize"] is True
    assert [m["parameters"]["density"] for m in ties["models"]] == [0.2] * 3
    ta = yaml.safe_load(configs["task_arithmetic"].read_text())
    assert ta["parameters"]["normalize"] is False and "density" not in ta["models"][0]["parameters"]


def test_find_mergekit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(benchmark.MERGEKIT_ENV, raising=False)
    assert benchmark.find_mergekit() is None
    script = tmp_path / "mk" / "mergekit-yaml"
    script.parent.mkdir()
    script.write_text("#!/usr/bin/python3\nprint('hi')\n")
    script.chmod(0o755)
    monkeypatch.setenv(benchmark.MERGEKIT_ENV, str(script))
    assert benchmark.find_mergekit() == script.resolve()
    assert benchmark.find_mergekit(str(tmp_path / "missing")) == script.resolve()


def test_bad_arguments_are_input_errors(tmp_path):
    from lines_fast.errors import MergeInputError

    with pytest.raises(MergeInputError, match="--methods"):
        benchmark.run_benchmark("tiny", methods="soup", workdir=str(tmp_path))
    with pytest.raises(MergeInputError, match="--compare"):
        benchmark.run_benchmark("tiny", compare="reference,mergekt", workdir=str(tmp_path))
    with pytest.raises(MergeInputError, match="--repeats"):
        benchmark.run_benchmark("tiny", repeats=0, workdir=str(tmp_path))


def test_compare_mergekit_without_mergekit_is_refused(tmp_path, monkeypatch, capsys):
    """Asked for by name, a missing mergekit stops the bench (exit 2) before anything is generated."""
    from lines_fast.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LINES_FAST_MERGEKIT", raising=False)
    assert main(["bench", "--workload", "tiny", "--compare", "mergekit", "--workdir", str(tmp_path / "w")]) == 2
    assert "mergekit-yaml was not found" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cpu_scaling_cases_split_each_core_count_among_workers():
    from bench.cpu_threads import SUMMARY_TIMES, cases
    assert cases([1, 2, 4], [1, 2, 3]) == [("1", 1, 1), ("2", 1, 2), ("2 (2 workers)", 2, 1), ("4", 1, 4),
                                          ("4 (2 workers)", 2, 2)]
    line = "merged 21 tensors (ties, cpu) in 0.13 s: read 0.6 MB (0.00 GB/s), wrote 0.2 MB in 1 pass -> out"
    assert SUMMARY_TIMES.search(line).groups() == ("0.13", None, "0.6", "MB")
    line = line.replace(" s: read", " s (+1.27 s importing torch): read")
    assert SUMMARY_TIMES.search(line).groups() == ("0.13", "1.27", "0.6", "MB")
