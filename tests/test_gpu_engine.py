"""The engine's --device cuda path end to end against the reference (skipped without a GPU).

The same engine cases run through the Triton kernels in the interpreter in CI
(tests/test_engine.py); here they run compiled on a real GPU, through the pinned-memory
pipeline, with tensors forced into several parts.
"""
from __future__ import annotations

import os

import pytest
import torch

import lines_fast
from lines_fast.reference import merge_state_dicts
from lines_fast.spec import LinesSpec
from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.tolerance import compare

from helpers import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU with compiled Triton kernels"),
]




@pytest.mark.parametrize("method, params", [
    ("ties", dict(density=0.2)),
    ("ties", dict(density=0.1, trim_scope="global", lines=LinesSpec("auto", 1.0))),
    ("ties", dict(density=0.3, lines=LinesSpec("auto", 0.5))),  # one upload for thresholds and both norms
    ("dare_ties", dict(density=0.4, seed=9)),
    ("task_arithmetic", dict(lam=0.7)),
    ("linear", dict()),
])
def test_cuda_engine_equals_reference(method, params, tmp_path):
    family = write_checkpoint_family(tmp_path / "in", recipe("tiny"), n_finetunes=3, dtype=torch.bfloat16,
                                     max_shard_size=60_000, int_tensor=True)
    doc = {"merge_method": method, "base_model": str(family.base),
           "models": [{"model": str(p), "parameters": {"density": params.get("density", 1.0)}}
                      for p in family.finetunes],
           "parameters": {"trim_scope": params.get("trim_scope", "tensor")}, "seed": params.get("seed", 0)}
    if "lam" in params:
        doc["parameters"]["lambda"] = params["lam"]
    if "lines" in params:
        doc["lines"] = {"alpha": params["lines"].alpha, "beta": params["lines"].beta}
    result = lines_fast.merge(doc, tmp_path / "out", device="cuda", progress=False, log=lambda m: None)
    assert result.backend == "cuda"
    merged = load(result.out_dir)
    expected = merge_state_dicts(load(family.base), [load(p) for p in family.finetunes], method,
                                 density=params.get("density", 1.0), lam=params.get("lam"),
                                 trim_scope=params.get("trim_scope", "tensor"), seed=params.get("seed", 0),
                                 lines=params.get("lines"),
                                 normalize=method in ("ties", "dare_ties", "linear"))
    for name, ref in expected.items():
        verdict = compare(merged[name], ref)
        assert verdict.ok, f"{name}: {verdict.why}"


def test_cuda_runs_are_bitwise_identical(tmp_path):
    """Same inputs, options and seed on the GPU path: byte-identical output files."""
    family = write_checkpoint_family(tmp_path / "in", recipe("tiny"), n_finetunes=3, dtype=torch.bfloat16)
    doc = {"merge_method": "dare_ties", "base_model": str(family.base), "seed": 5,
           "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in family.finetunes],
           "lines": {"alpha": "auto", "beta": 1.0}}
    outs = [lines_fast.merge(doc, tmp_path / f"out{i}", device="cuda", progress=False, log=lambda m: None).out_dir
            for i in range(2)]
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
