"""Small tensors merged packed end to end (engine._packs): the same bytes as one job per tensor,
errors still naming the tensor, and packs only where the plan is elementwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lines_fast import engine
from lines_fast.backends.cpu import CpuBackend
from lines_fast.engine import merge
from lines_fast.errors import MergeInputError
from lines_fast.reference import merge_state_dicts
from lines_fast.spec import LinesSpec

from helpers import load, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors_of(seed: int) -> dict[str, torch.Tensor]:
    """4 layers of 12 small 'experts' (sizes 1..400, bf16 and a few float32), an int tensor in the
    middle of the order (copied: packs must not straddle it) and one tensor too big to pack."""
    g = torch.Generator().manual_seed(0)
    out = {"model.embed_tokens.weight": torch.randn(200, 8, generator=g)}
    for layer in range(4):
        for e in range(12):
            numel = 1 + (37 * e + 11 * layer) % 400
            t = torch.randn(numel, generator=g)
            out[f"model.layers.{layer}.mlp.experts.{e}.weight"] = t if e == 11 else t.bfloat16()
        if layer == 1:
            out["model.layers.1.mlp.router_step"] = torch.arange(6, dtype=torch.int64)
    out["model.layers.3.mlp.big.weight"] = torch.randn(engine.PACK_TENSOR_MAX + 5, generator=g).bfloat16()
    noise = torch.Generator().manual_seed(seed)
    return {n: t if not t.is_floating_point() or seed == 0 else
            (t.float() + 0.05 * torch.randn(t.shape, generator=noise)).to(t.dtype) for n, t in out.items()}


def write_family(root: Path, tensors) -> Path:
    """base, ft1..ft3 from tensors(seed) (seed 0: the base)."""
    for i, model in enumerate(("base", "ft1", "ft2", "ft3")):
        (root / model).mkdir()
        write_safetensors(root / model / "model.safetensors", tensors(i))
    return root


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    return write_family(tmp_path_factory.mktemp("packing"), tensors_of)


def config(fam: Path, method: str, **top) -> dict:
    params = {"density": 0.3} if method in ("ties",) else {}
    base = {} if method == "linear" else {"base_model": str(fam / "base")}
    return {"merge_method": method, **base,
            "models": [{"model": str(fam / f"ft{i}"), "parameters": {"weight": w, **params}}
                       for i, w in ((1, 1.0), (2, 0.6), (3, 0.3))], **top}


CASES = {
    "task_arithmetic+lines": ("task_arithmetic", {"lines": {"alpha": 0.4, "beta": 0.8}}),
    "linear": ("linear", {}),
    "ties_global": ("ties", {"parameters": {"trim_scope": "global"}}),
    "ties_global+lines_auto": ("ties", {"parameters": {"trim_scope": "global"}, "lines": {"beta": 1.0}}),
    "ties_tensor": ("ties", {}),   # per-tensor thresholds: packed only with tensors of its size (none here)
}


def jobs_counted(monkeypatch) -> list:
    names = []
    real = CpuBackend.merge_many

    def counting(self, jobs, plan):
        def spy():
            for job in jobs:
                names.append(job.name)
                yield job
        return real(self, spy(), plan)
    monkeypatch.setattr(CpuBackend, "merge_many", counting)
    return names


@pytest.mark.parametrize("case", list(CASES))
def test_packed_merge_writes_the_bytes_of_one_job_per_tensor(fam, tmp_path, monkeypatch, case):
    method, top = CASES[case]
    options = dict(device="cpu", progress=False, log=lambda m: None, max_shard_size="20KB")
    jobs = jobs_counted(monkeypatch)
    merge(config(fam, method, **top), tmp_path / "packed", **options)
    packed_jobs = list(jobs)
    jobs.clear()
    monkeypatch.setattr(engine, "PACK_TENSOR_MAX", 0)   # one job per tensor
    merge(config(fam, method, **top), tmp_path / "single", **options)
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    assert files == sorted(p.name for p in (tmp_path / "packed").iterdir())
    for f in files:
        assert (tmp_path / "packed" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
    n_merged = len(jobs)
    assert n_merged == 50   # 48 experts + embeddings + big (the int tensor is copied)
    if case == "ties_tensor":
        assert len(packed_jobs) == n_merged
    else:
        # Packs break at dtype changes, LiNeS's layer scales, shards are irrelevant: far fewer jobs.
        assert len(packed_jobs) < n_merged // 3, packed_jobs
        assert any(j.endswith("tensors from model.layers.0.mlp.experts.0.weight") or " tensors from " in j
                   for j in packed_jobs)


def test_packed_task_arithmetic_with_lines_equals_the_reference(fam, tmp_path):
    merge(config(fam, "task_arithmetic", lines={"alpha": 0.4, "beta": 0.8}),
          tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    base = load(fam / "base")
    expected = merge_state_dicts(base, [load(fam / f"ft{i}") for i in (1, 2, 3)], "task_arithmetic",
                                 weight=[1.0, 0.6, 0.3], lines=LinesSpec(alpha=0.4, beta=0.8))
    got = load(tmp_path / "out")
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_nan_in_a_packed_tensor_names_that_tensor_and_model(fam, tmp_path, capsys):
    bad = tmp_path / "ft2"
    bad.mkdir()
    tensors = tensors_of(2)
    victim = "model.layers.2.mlp.experts.6.weight"
    tensors[victim] = tensors[victim].clone()
    tensors[victim][3] = float("nan")
    write_safetensors(bad / "model.safetensors", tensors)
    cfg = config(fam, "linear")
    cfg["models"][1]["model"] = str(bad)
    with pytest.raises(MergeInputError) as err:
        merge(cfg, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    assert f"tensor '{victim}'" in str(err.value) and str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_float16_overflow_in_a_packed_tensor_names_it(fam, tmp_path):
    big = tmp_path / "ft1"
    big.mkdir()
    tensors = tensors_of(1)
    victim = "model.layers.1.mlp.experts.3.weight"
    tensors[victim] = torch.full_like(tensors[victim], 3e4)
    write_safetensors(big / "model.safetensors", tensors)
    cfg = config(fam, "task_arithmetic", parameters={"lambda": 4.0}, out_dtype="float16")
    cfg["models"][0]["model"] = str(big)
    with pytest.raises(MergeInputError, match=f"tensor '{victim}'.*float16"):
        merge(cfg, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_dare_with_compiled_draws_and_sums_writes_the_same_bytes(fam, tmp_path, monkeypatch, method):
    """The engine end to end with the compiled draws, L1 sums and DELLA ranks from the start
    (JIT_AFTER = 0)."""
    from lines_fast import jit

    if jit.kernels() is None:
        pytest.skip("numba is not installed")
    cfg = {**config(fam, method), "parameters": {"seed": 3}}
    for m in cfg["models"]:
        m["parameters"]["density"] = 0.4
    options = dict(device="cpu", progress=False, log=lambda m: None)
    monkeypatch.setattr(jit, "JIT_AFTER", 1 << 62)   # torch only
    merge(cfg, tmp_path / "torch", **options)
    monkeypatch.setattr(jit, "JIT_AFTER", 0)
    merge(cfg, tmp_path / "jit", **options)
    for f in sorted(p.name for p in (tmp_path / "torch").iterdir()):
        assert (tmp_path / "jit" / f).read_bytes() == (tmp_path / "torch" / f).read_bytes(), f


# -- tensor-scope thresholds: packs of equal-sized tensors, a threshold each (MergeJob.segments) --
def equal_tensors_of(seed: int) -> dict[str, torch.Tensor]:
    """3 layers of 10 experts of 96 elements and 2 norms of 33 (bf16), many exact ties in |tau|."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(3):
        for e in range(10):
            out[f"model.layers.{layer}.mlp.experts.{e}.weight"] = torch.randn(96, generator=g).bfloat16()
        for k in range(2):
            out[f"model.layers.{layer}.norm{k}.weight"] = torch.randn(33, generator=g).bfloat16()
    noise = torch.Generator().manual_seed(seed)
    return {n: t if seed == 0 else (t.float() + 0.05 * torch.randn(t.shape, generator=noise)).to(t.dtype)
            for n, t in out.items()}


@pytest.fixture(scope="module")
def equal_fam(tmp_path_factory) -> Path:
    return write_family(tmp_path_factory.mktemp("packing-equal"), equal_tensors_of)


@pytest.mark.parametrize("method,top", [
    ("ties", {}),
    ("ties", {"lines": {"alpha": 0.3, "beta": 0.9}}),
    ("breadcrumbs_ties", {"parameters": {"gamma": 0.05}}),
    ("breadcrumbs", {"parameters": {"gamma": 0.1}}),
    ("dare_ties", {"parameters": {"seed": 11}}),                       # L1 rescale: a factor per tensor
    ("dare_linear", {"parameters": {"rescale": "inverse", "seed": 2}}),
    ("dare_ties", {"parameters": {"rescale": False}, "lines": {"alpha": 0.2, "beta": 1.0}}),
    ("ties", {"parameters": {"rescale": True}}),   # trims + L1 rescale: not packed, same bytes
])
def test_tensor_scope_thresholds_pack_equal_sized_tensors_to_the_same_bytes(equal_fam, tmp_path, monkeypatch,
                                                                             method, top):
    cfg = config(equal_fam, method, **top)
    for m in cfg["models"]:
        m["parameters"]["density"] = 0.4
    options = dict(device="cpu", progress=False, log=lambda m: None)
    jobs = jobs_counted(monkeypatch)
    merge(cfg, tmp_path / "packed", **options)
    packed_jobs = list(jobs)
    jobs.clear()
    monkeypatch.setattr(engine, "PACK_TENSOR_MAX", 0)
    merge(cfg, tmp_path / "single", **options)
    packs = top.get("parameters", {}).get("rescale") is not True or method != "ties"
    assert len(jobs) == 36 and (len(packed_jobs) <= 12 if packs else len(packed_jobs) == 36), packed_jobs
    for f in sorted(p.name for p in (tmp_path / "single").iterdir()):
        assert (tmp_path / "packed" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f


def test_packed_ties_tensor_scope_equals_the_reference(equal_fam, tmp_path):
    cfg = config(equal_fam, "ties")
    merge(cfg, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    base = load(equal_fam / "base")
    expected = merge_state_dicts(base, [load(equal_fam / f"ft{i}") for i in (1, 2, 3)], "ties",
                                 weight=[1.0, 0.6, 0.3], density=0.3)
    got = load(tmp_path / "out")
    for name in got:
        assert torch.equal(got[name], expected[name]), name
