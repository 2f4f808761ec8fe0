"""Memory follows a chunk, not the largest tensor: a huge tensor is merged and written a chunk at
a time (MergeJob.stream), its input pages released behind each chunk, with the same bytes as
the whole-tensor path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lines_fast.engine as engine
from lines_fast.engine import merge
from lines_fast.writer import ShardedWriter

from helpers import load

REPO = Path(__file__).resolve().parents[1]


def one_tensor_family(root: Path, numel: int, models: int = 2) -> Path:
    """base, ft1..ftN holding one bf16 tensor of `numel` elements (plus a small one), written
    piece by piece so the test itself never holds a whole tensor."""
    names = [("model.layers.0.mlp.experts.weight", (numel // 1024, 1024)), ("model.norm.weight", (1024,))]
    for k, folder in enumerate(["base"] + [f"ft{i + 1}" for i in range(models)]):
        w = ShardedWriter(root / folder, [(n, torch.bfloat16, s) for n, s in names], max_shard_size=1 << 40,
                          metadata={"lines_fast_synthetic": "one-tensor"}, durable=False)
        for name, shape in names:
            g = torch.Generator().manual_seed(k)
            total = torch.Size(shape).numel()
            for s in range(0, total, 1 << 22):
                n = min(1 << 22, total - s)
                piece = torch.randn(n, generator=g) * 0.02 + (0 if k == 0 else torch.randn(n, generator=g) * 0.002)
                w.write_piece(name, piece.to(torch.bfloat16))
        w.finish()
    return root


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}),
                                            ("task_arithmetic", {})])
def test_streamed_output_is_byte_identical_to_the_whole_tensor_path(tmp_path, monkeypatch, method, params):
    fam = one_tensor_family(tmp_path / "fam", 5 << 20)
    doc = {"merge_method": method, "base_model": str(fam / "base"), "parameters": params,
           "models": [{"model": str(fam / "ft1")}, {"model": str(fam / "ft2")}]}
    merge(doc, tmp_path / "streamed", device="cpu", progress=False, log=lambda s: None)
    monkeypatch.setattr(engine, "STREAM_MIN", 1 << 40)
    merge(doc, tmp_path / "whole", device="cpu", progress=False, log=lambda s: None)
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert len(load(tmp_path / "whole")) == 2


_PEAK = """
import sys
import lines_fast
from lines_fast.engine import merge
root, out, method, preload = sys.argv[1:5]
if preload == "1":   # the compiled kernels from the start (numba, LLVM, their threads: ~130 MB)
    from lines_fast import jit
    jit.JIT_AFTER = 0
    jit.kernels()   # loaded now, not by a background prefetch the small merge might finish before
doc = {"merge_method": method, "base_model": root + "/base", "parameters": {"density": 0.3} if method == "ties" else {},
       "models": [{"model": root + "/ft1"}, {"model": root + "/ft2"}]}
merge(doc, out, device="cpu", progress=False, log=lambda s: None)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _peak_kb(root: Path, out: Path, method: str, path: str) -> int:
    """path "compiled": both runs use the compiled kernels from the start (the large merge would load
    them, the small one not); "torch": neither loads numba."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path == "torch":
        env["LINES_FAST_NO_NUMBA"] = "1"
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(root), str(out), method, str(int(path == "compiled"))],
                          capture_output=True, text=True, cwd=REPO, env=env, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", ["torch", "compiled"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_peak_memory_stays_far_below_one_tensor(tmp_path, method, path):
    """One tensor of 64M elements (128 MB per input, 384 MB of inputs, 128 MB of output): the merge
    adds well under one input tensor's size to the process's peak (the whole-tensor path mapped
    all three inputs and held the output: ~512 MB)."""
    big = one_tensor_family(tmp_path / "big", 64 << 20)
    small = one_tensor_family(tmp_path / "small", 1 << 20)
    baseline = _peak_kb(small, tmp_path / "out-small", method, path)
    peak = _peak_kb(big, tmp_path / "out-big", method, path)
    tensor_kb = (64 << 20) * 2 // 1024
    assert peak - baseline < tensor_kb // 2, f"peak {peak} KB vs {baseline} KB for a 1M-element tensor"


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("della", {"density": 0.5})])
def test_the_triton_backend_streams_parts_with_the_same_bytes(tmp_path, monkeypatch, method, params):
    """--device interpret with every tensor streamed (STREAM_MIN lowered) and parts of 40K elements:
    the same bytes as its whole-tensor path and as the CPU backend."""
    pytest.importorskip("triton")
    import lines_fast.backends.triton_backend as tb

    fam = one_tensor_family(tmp_path / "fam", 1 << 17)
    doc = {"merge_method": method, "base_model": str(fam / "base"), "parameters": params,
           "models": [{"model": str(fam / "ft1")}, {"model": str(fam / "ft2")}]}
    original = tb.TritonBackend.__init__
    monkeypatch.setattr(tb.TritonBackend, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "chunk_elements": 40_000}))
    monkeypatch.setattr(engine, "STREAM_MIN", 1 << 10)
    merge(doc, tmp_path / "streamed", device="interpret", progress=False, log=lambda s: None)
    merge(doc, tmp_path / "cpu", device="cpu", progress=False, log=lambda s: None)
    monkeypatch.setattr(engine, "STREAM_MIN", 1 << 40)
    merge(doc, tmp_path / "whole", device="interpret", progress=False, log=lambda s: None)
    streamed = (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert streamed == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert streamed == (tmp_path / "cpu" / "model.safetensors").read_bytes()
