"""The engine's files equal the reference's in-memory result, for every method and scope.

Inputs are synthetic Llama-shaped families (lines_fast.synth) with several shards, tensors
of mixed sizes, a non-float tensor, in fp32 and bf16. Outputs are read back from disk and
compared with lines_fast.reference.merge_state_dicts within docs/methods.md's tolerances.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import lines_fast
from lines_fast.reference import merge_state_dicts
from lines_fast.spec import LinesSpec
from lines_fast.synth import Recipe, recipe, write_checkpoint_family
from lines_fast.tolerance import compare

from helpers import load




@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"family-{str(request.param).split('.')[-1]}")
    # ~60 KB shards: every model spans several files, and tensors of many sizes.
    paths = write_checkpoint_family(root, recipe("tiny"), n_finetunes=3, dtype=request.param, seed=1,
                                    max_shard_size=60_000, int_tensor=True)
    loaded = {"base": load(paths.base), "models": [load(p) for p in paths.finetunes]}
    return paths, loaded


# case -> the method's parameters by their config names, plus models (count), lines, and
# base_weight (linear: the YAML's top-level weight averages base_model in, as in mergekit).
CASES = {
    "linear": dict(weight=[1.0, 2.0, 0.5]),
    "linear-unnormalized": dict(method="linear", weight=[0.2, 0.3, 0.5], normalize=False),
    "linear-with-base": dict(method="linear", base_weight=1.0),
    "wise_ft": dict(models=1, **{"lambda": 0.3}),
    "task_arithmetic": dict(weight=[1.0, 0.5, 0.25], **{"lambda": 0.8}),
    "task_arithmetic-normalized": dict(method="task_arithmetic", weight=[1.0, 0.5, 0.25], normalize=True),
    "ties": dict(density=[0.2, 0.3, 0.5], **{"lambda": 1.5}),
    "ties-weighted-unnormalized": dict(method="ties", density=0.2, weight=[1.0, 2.0, 0.5], normalize=False),
    "ties-global": dict(method="ties", density=0.1, trim_scope="global"),
    "ties-rescale": dict(method="ties", density=0.3, rescale=True),
    "dare_linear": dict(density=0.3, seed=7),
    "dare_linear-inverse": dict(method="dare_linear", density=0.3, seed=7, rescale="inverse"),
    "dare_ties": dict(density=[0.5, 0.4, 0.3], seed=11, weight=[1.0, 0.7, 1.3]),
    "ties-lines-auto": dict(method="ties", density=0.2, lines=LinesSpec("auto", 1.0)),
    "ties-global-lines-auto": dict(method="ties", density=0.2, trim_scope="global",
                                   lines=LinesSpec("auto", 0.7, "last")),
    "task_arithmetic-lines-given": dict(method="task_arithmetic", lines=LinesSpec(0.4, 1.1)),
    "linear-lines": dict(method="linear", normalize=False, weight=[0.5, 0.25, 0.5], base_weight=0.25,
                         lines=LinesSpec(0.5, 0.5)),
    "dare_ties-lines-auto": dict(method="dare_ties", density=0.5, seed=3, lines=LinesSpec("auto", 1.0)),
    "wise_ft-lines-gamma": dict(method="wise_ft", models=1, lines=LinesSpec(0.25, 0.75)),
}
_NOT_PARAMS = ("models", "lines", "base_weight")


def _config(paths, method, params) -> dict:
    """A mergekit-format YAML document: per-model parameters under models[], the rest under
    parameters (the seed at the top, as lines_fast reads it)."""
    n = params.get("models", 3)
    per_model = {k: (v if isinstance(v, list) else [v] * n) for k, v in params.items()
                 if k in ("weight", "density")}
    shared = {k: v for k, v in params.items() if k not in per_model and k not in _NOT_PARAMS and k != "seed"}
    doc = {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": {k: v[i] for k, v in per_model.items()}}
                   for i, p in enumerate(paths.finetunes[:n])],
        "parameters": shared,
    }
    if method != "linear" or "base_weight" in params:
        doc["base_model"] = str(paths.base)
    if "base_weight" in params:
        doc["parameters"]["weight"] = params["base_weight"]
    if "seed" in params:
        doc["seed"] = params["seed"]
    lines = params.get("lines")
    if lines is not None:
        doc["lines"] = {"alpha": lines.alpha, "beta": lines.beta, "outside": lines.outside}
    return doc


def _expected(loaded, method, params, **extra):
    """The reference's merge of the same case."""
    n = params.get("models", 3)
    values = {k: v for k, v in params.items() if k not in _NOT_PARAMS}
    return merge_state_dicts(loaded["base"], loaded["models"][:n], method, lines=params.get("lines"),
                             base_weight=params.get("base_weight"), **values, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_files_equal_reference(case, family, tmp_path):
    paths, loaded = family
    params = dict(CASES[case])
    method = params.pop("method", case)
    doc = _config(paths, method, params)
    result = lines_fast.merge(doc, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    merged = load(result.out_dir)
    expected = _expected(loaded, method, params)
    assert set(merged) == set(expected)
    for name, ref in expected.items():
        verdict = compare(merged[name], ref)
        assert verdict.ok, f"{case} {name}: {verdict.why} (max diff {verdict.max_abs_diff})"
    # The non-float tensor passes through from the base, bit for bit.
    assert torch.equal(merged["model.position_ids"], loaded["base"]["model.position_ids"])


@pytest.mark.parametrize("case", ["ties", "ties-lines-auto", "ties-global-lines-auto", "dare_ties", "linear",
                                  "task_arithmetic-lines-given", "ties-rescale"])
def test_engine_kernel_path_in_interpreter_equals_reference(case, family, tmp_path):
    """--device interpret: the engine drives the Triton kernels (in Triton's interpreter here)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is off in this process (a GPU runs the compiled twin of this test)")
    paths, loaded = family
    params = dict(CASES[case])
    method = params.pop("method", case)
    result = lines_fast.merge(_config(paths, method, params), tmp_path / "out", device="interpret",
                              progress=False, log=lambda m: None)
    assert result.backend == "interpret"
    merged = load(result.out_dir)
    expected = _expected(loaded, method, params)
    for name, ref in expected.items():
        verdict = compare(merged[name], ref)
        assert verdict.ok, f"{case} {name}: {verdict.why}"


def test_output_layout_is_hf(family, tmp_path):
    paths, loaded = family
    doc = _config(paths, "ties", {"density": 0.2})
    out = lines_fast.merge(doc, tmp_path / "out", device="cpu", progress=False, log=lambda m: None,
                           max_shard_size=100_000).out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded["base"].values())
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    for shard in shards:
        assert (out / shard).stat().st_size <= 100_000 + 10_000  # limit plus one header
        with open(out / shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        meta = header["__metadata__"]
        assert meta["lines_fast_version"] == lines_fast.__version__
        assert json.loads(meta["lines_fast_recipe"])["merge_method"] == "ties"
    assert not Path(str(out) + ".lines-fast-partial").exists()


def test_mergekit_yaml_runs_unchanged(family, tmp_path):
    """A mergekit user's config for ties and task_arithmetic runs as written (relative paths too)."""
    paths, loaded = family
    model_params = {"ties": "{weight: 1.0, density: 0.2}", "task_arithmetic": "{weight: 0.5}"}
    for method, per_model in model_params.items():
        text = textwrap.dedent(f"""\
            merge_method: {method}
            base_model: {paths.base}
            models:
              - model: {paths.finetunes[0]}
                parameters: {per_model}
              - model: {paths.finetunes[1]}
                parameters: {per_model}
            parameters:
              lambda: 1.0
              normalize: {'true' if method == 'ties' else 'false'}
              int8_mask: true
            dtype: float32
            out_dtype: bfloat16
            tokenizer_source: base
            """)
        config = tmp_path / f"{method}.yml"
        config.write_text(text)
        doc = yaml.safe_load(text)
        assert doc["models"][0]["parameters"]  # the YAML above parsed as intended
        out = tmp_path / f"out-{method}"
        from lines_fast.cli import main
        assert main(["merge", str(config), str(out), "--no-progress", "-q"]) == 0
        merged = load(out)
        kw = {"density": 0.2, "weights": [1.0, 1.0]} if method == "ties" else {"weights": [0.5, 0.5]}
        expected = merge_state_dicts(loaded["base"], loaded["models"][:2], method, out_dtype=torch.bfloat16, **kw)
        for name, ref in expected.items():
            assert compare(merged[name], ref).ok, name


@pytest.mark.parametrize("key, snippet", [
    ("slices", "slices:\n  - sources: []\n"),
    ("bool list", "parameters:\n  normalize: [true, false]\n"),
    ("method", None),
])
def test_unsupported_mergekit_yaml_is_refused_by_name(key, snippet, family, tmp_path, capsys):
    paths, _ = family
    method = "karcher" if key == "method" else "ties"
    text = f"merge_method: {method}\nbase_model: {paths.base}\nmodels:\n  - model: {paths.finetunes[0]}\n"
    if snippet:
        text += snippet
    config = tmp_path / "bad.yml"
    config.write_text(text)
    from lines_fast.cli import main
    assert main(["merge", str(config), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    expected_word = {"slices": "slices", "bool list": "takes one value, not a per-layer list",
                     "method": "karcher"}[key]
    assert expected_word in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


_RSS_SCRIPT = """
import os, sys
from lines_fast.cli import main
code = main(["merge", "--method", "ties", "--base", sys.argv[1] + "/base", "--model", sys.argv[1] + "/ft1",
             "--model", sys.argv[1] + "/ft2", "--density", "0.2", "-o", sys.argv[2], "-q", "--no-progress"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def _peak_rss_kb(tmp_path: Path, layers: int) -> int:
    shape = Recipe(name=f"mem-{layers}", hidden=1024, intermediate=4096, layers=layers, heads=8, kv_heads=8,
                   vocab=2048)
    family_dir = tmp_path / f"fam{layers}"
    write_checkpoint_family(family_dir, shape, n_finetunes=2, dtype=torch.bfloat16, seed=0)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(family_dir), str(tmp_path / f"out{layers}")],
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Doubling the layers (each ~100 MB of input across 3 checkpoints) must not raise peak RSS by > 10%."""
    shallow = _peak_rss_kb(tmp_path, 2)
    deep = _peak_rss_kb(tmp_path, 4)
    assert deep <= 1.10 * shallow, f"peak RSS {shallow} KB with 2 layers, {deep} KB with 4"


def test_global_refine_pass_runs_only_when_a_threshold_needs_it(family, tmp_path):
    """Pass 1 settles a global threshold exactly when its low 16 bits are 0 (usual for bf16
    deltas); the refine pass runs only when some model's threshold has nonzero low bits."""
    paths, loaded = family
    doc = _config(paths, "ties", dict(density=0.1, trim_scope="global"))
    logs = []
    lines_fast.merge(doc, tmp_path / "out", device="cpu", progress=False, log=logs.append)
    taus = [{name: m[name].float() - loaded["base"][name].float() for name in m
             if m[name].is_floating_point() and name != "model.position_ids"} for m in loaded["models"]]
    from lines_fast.reference import trim_thresholds
    from lines_fast.selection import float_to_bits

    thresholds = [next(iter(trim_thresholds(tau, 0.1, "global").values())) for tau in taus]
    needs_refine = any(float_to_bits(t) & 0xFFFF for t in thresholds)
    skipped = any("(refine) not needed" in line for line in logs)
    ran = any(line.startswith("pass 2/3 (refine) took") for line in logs)
    assert (ran, skipped) == (needs_refine, not needs_refine), (thresholds, logs)
    assert any(f"{thresholds[0]:.6g}" in line for line in logs if line.startswith("global trim thresholds"))


def test_journaled_statistics_round_trip_exactly():
    """α and global thresholds survive a resume bit for bit (hex floats), inf included."""
    from lines_fast.planning import RunStats

    stats = RunStats()
    stats.alpha = 0.1 + 0.2
    stats.global_thresholds = (float("inf"), 1.401298464324817e-45, 0.0009765625)
    back = RunStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert back.alpha == stats.alpha and back.global_thresholds == stats.global_thresholds
    assert RunStats.from_json(RunStats().to_json()).alpha is None


def test_each_pass_asks_the_kernel_to_read_the_next_tensor_ahead(family, tmp_path, monkeypatch):
    """MADV_WILLNEED for tensor k + 1 while tensor k is merged: cold reads overlap compute
    (a task_arithmetic merge of llama-336m from a cold page cache: 7.5-9 s -> 5.9-6.8 s)."""
    from lines_fast.checkpoint import Checkpoint

    asked = []
    monkeypatch.setattr(Checkpoint, "prefetch", lambda self, name: asked.append((self.label, name)))
    monkeypatch.setattr(lines_fast.engine, "PACK_TENSOR_MAX", 0)   # a job per tensor (a pack prefetches its first)
    paths, _ = family
    doc = _config(paths, "ties", dict(density=0.2, lines=LinesSpec("auto", 1.0)))  # norms + merge passes
    result = lines_fast.merge(doc, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    merged = [n for n in load(result.out_dir) if n != "model.position_ids"]
    base_label = asked[0][0]
    order = [name for label, name in asked if label == base_label]
    assert order == merged[1:] * 2  # every tensor but the first, once per pass, in merge order
    assert len(asked) == 4 * len(order)  # on the base and each of the 3 models


def test_a_merge_leaves_the_garbage_collector_as_it_found_it(family, tmp_path):
    """The engine freezes the objects alive at its start and collects less often while it runs
    (a 10^4-tensor header set off full collections); a library user's process gets its settings
    back, after a failed merge too."""
    import gc

    paths, _ = family
    before = gc.get_threshold()
    seen = {}
    doc = _config(paths, "ties", {"density": 0.2})

    def log(message):
        seen.setdefault("during", (gc.get_threshold(), gc.get_freeze_count()))
    lines_fast.merge(doc, tmp_path / "out", device="cpu", progress=False, log=log)
    assert seen["during"][0][0] >= 70_000 and seen["during"][1] > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    from lines_fast.errors import MergeInputError

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a merge")   # refused inside the run
    with pytest.raises(MergeInputError, match="taken"):
        lines_fast.merge(doc, tmp_path / "taken", device="cpu", progress=False, force=True, log=lambda m: None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
