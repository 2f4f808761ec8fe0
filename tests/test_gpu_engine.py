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
from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.tolerance import compare

from helpers import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU with compiled Triton kernels"),
]




@pytest.mark.parametrize("case", ["ties", "ties-global-lines-auto", "ties-lines-auto", "ties-rescale", "dare_ties",
                                  "dare_linear-inverse", "task_arithmetic", "task_arithmetic-normalized", "linear",
                                  "linear-lines"])
def test_cuda_engine_equals_reference(case, tmp_path):
    """The engine's --device cuda path on test_engine.py's cases (same configs, same reference)."""
    from test_engine import CASES, _config, _expected

    family = write_checkpoint_family(tmp_path / "in", recipe("tiny"), n_finetunes=3, dtype=torch.bfloat16,
                                     max_shard_size=60_000, int_tensor=True)
    params = dict(CASES[case])
    method = params.pop("method", case)
    result = lines_fast.merge(_config(family, method, params), tmp_path / "out", device="cuda", progress=False,
                              log=lambda m: None)
    assert result.backend == "cuda"
    merged = load(result.out_dir)
    loaded = {"base": load(family.base), "models": [load(p) for p in family.finetunes]}
    for name, ref in _expected(loaded, method, params).items():
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


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_cuda_merges_adapters_with_their_products_on_the_gpu(method, tmp_path, monkeypatch):
    """LoRA adapters with --device cuda: B A computed on the GPU (AdapterCheckpoint.compute_device),
    the merge equal to that of the materialised fine-tunes within tolerance."""
    from test_lora import adapter_family
    from lines_fast.lora import AdapterCheckpoint

    base, adapters, fulls = adapter_family(tmp_path / "fam")
    devices = []
    real = AdapterCheckpoint.tensor

    def spy(self, name):
        devices.append(torch.device(self.compute_device).type)
        return real(self, name)
    monkeypatch.setattr(AdapterCheckpoint, "tensor", spy)

    params = {"ties": {"density": 0.5}, "task_arithmetic": {}, "dare_ties": {"density": 0.5, "seed": 1}}[method]

    def doc(models):
        return {"merge_method": method, "base_model": str(base), "parameters": params,
                "models": [{"model": str(m)} for m in models]}
    options = dict(device="cuda", progress=False, log=lambda m: None)
    got_doc, want_doc = doc(adapters), doc(fulls)
    lines_fast.merge(want_doc, tmp_path / "want", **options)
    lines_fast.merge(got_doc, tmp_path / "got", **options)
    assert devices and set(devices) == {"cuda"}
    got, want = load(tmp_path / "got"), load(tmp_path / "want")
    for name in want:
        verdict = compare(got[name], want[name])
        assert verdict.ok, (name, verdict.why)
