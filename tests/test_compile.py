"""The kernels compile for an H100 (sm_90) on this machine, without a GPU: no register spills,
16-byte vector loads (bench/compile_check.py). The interpreter tests prove the kernels'
results; this proves the compiled twin exists and keeps the shape that reaches bandwidth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_variant_compiles_for_sm90_without_spills(tmp_path):
    try:
        from triton import knobs

        if not os.path.exists(knobs.nvidia.cuobjdump.path):
            pytest.skip("this Triton build ships no cuobjdump")
    except (ImportError, AttributeError, RuntimeError):
        pytest.skip("this Triton build has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    from lines_fast import methods

    # every method the kernels run (tests/test_methods.py pins the gaps: della, della_linear)
    kernel_methods = set(methods.names()) - {"della", "della_linear"}
    assert {row["variant"].split()[0] for row in rows} >= kernel_methods | {"histogram"}
    for row in rows:
        assert row["ok"], (row["variant"], row["problems"], proc.stdout)
        assert row["local_bytes"] == 0 and row["registers"] > 0
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_compile_check_types_every_runtime_argument_of_the_kernels():
    """compile_check.py types each runtime argument by name and takes any other as a constexpr:
    an argument added to (or removed from) a kernel must be added to (or removed from) its table
    too, or the GPU session's compile check would build the wrong signature."""
    import inspect

    sys.path.insert(0, str(ROOT))
    from bench import compile_check
    from lines_fast.backends.triton_backend import import_kernels

    kmerge, kselect = import_kernels()
    for table, kernel in ((compile_check._MERGE_ARGS, kmerge._fused_merge_kernel),
                          (compile_check._HIST_ARGS, kselect._magnitude_hist_kernel)):
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        runtime = [n for n in names if n.upper() != n]   # constexpr switches are named in capitals
        assert set(table) == set(runtime), (sorted(set(table) - set(runtime)), sorted(set(runtime) - set(table)))
