"""Per-tensor overhead: the same bytes as many small tensors or as a few large ones.

    pytest bench/bench_many_tensors.py --benchmark-only        # 2,000 vs 20 tensors (quick)
    python bench/bench_many_tensors.py [--tensors 20000] [--out bench/results]   # the issue's case

Checkpoints with 10^4-10^5 tensors (MoE experts stored one per tensor, biases, norms) are
dominated by what each tensor costs beyond its bytes. Each family is a base and two bf16
fine-tunes; "small" holds N tensors of 64 elements, "large" 20 tensors holding the same
elements. Reported: seconds per merge in process (Engine, CPU backend, the median of 3 runs
after a warm one, small and large alternating), the ratio small / large, and the cost per
small tensor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import machine, write_result  # noqa: E402
from lines_fast.engine import merge  # noqa: E402
from lines_fast.writer import ShardedWriter  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties")
ROUNDS = 3   # the median of 3 timed merges is reported


def family(root: Path, tensors: int, numel: int) -> Path:
    """base, ft1, ft2 with `tensors` tensors of `numel` bf16 elements each (32 layers' names)."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i % 32}.experts.{i}.weight" for i in range(tensors)]
    base = {n: torch.randn(numel, generator=g).to(torch.bfloat16) for n in names}
    for model in ("base", "ft1", "ft2"):
        values = base if model == "base" else {
            n: (t.float() + 0.01 * torch.randn(numel, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        w = ShardedWriter(root / model, [(n, torch.bfloat16, (numel,)) for n in names], max_shard_size=1 << 40,
                          metadata={"lines_fast_synthetic": "many-tensors"}, durable=False)
        for n in w.pending_names():
            w.write(n, values[n])
        w.finish()
    return root


def timed_merge(root: Path, method: str, out: Path) -> float:
    doc = {"merge_method": method, "base_model": str(root / "base"),
           "models": [{"model": str(root / m), "parameters": {"density": 0.5} if method != "task_arithmetic" else {}}
                      for m in ("ft1", "ft2")]}
    t0 = time.perf_counter()
    merge(doc, out, device="cpu", progress=False, force=True, log=lambda m: None)
    return time.perf_counter() - t0


def measure(tensors: int, work: Path) -> dict:
    numel_small, n_large = 64, 20
    small = family(work / "small", tensors, numel_small)
    large = family(work / "large", n_large, tensors * numel_small // n_large)
    rows = {}
    for method in METHODS:
        runs = {"small": [], "large": []}
        for label, root in (("small", small), ("large", large)):
            timed_merge(root, method, work / f"warm-{label}")   # page cache and imports warm
        for _ in range(ROUNDS):   # alternating, so a slow spell of the machine hits both
            for label, root in (("small", small), ("large", large)):
                runs[label].append(timed_merge(root, method, work / f"out-{label}"))
        seconds = {label: statistics.median(times) for label, times in runs.items()}
        rows[method] = {"seconds": seconds, "runs": runs, "ratio_small_over_large": seconds["small"] / seconds["large"],
                        "ms_per_small_tensor": 1e3 * seconds["small"] / tensors}
    return {"tensors_small": tensors, "elements_per_small_tensor": numel_small, "tensors_large": n_large,
            "dtype": "bfloat16", "models": "base + 2 fine-tunes", "methods": rows}


def test_many_small_tensors(benchmark, tmp_path):
    small = family(tmp_path / "small", 2000, 64)
    benchmark.pedantic(timed_merge, args=(small, "ties", tmp_path / "out"), rounds=1, iterations=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=20000)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.tensors, Path(tmp))
    result.update({**machine(), "threads": torch.get_num_threads()})
    for method, row in result["methods"].items():
        print(f"{method}: {row['seconds']['small']:.2f} s for {args.tensors} tensors vs {row['seconds']['large']:.2f} s "
              f"for 20 (x{row['ratio_small_over_large']:.1f}); {row['ms_per_small_tensor']:.3f} ms per small tensor")
    write_result(args.out, "many-tensors-cpu", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
