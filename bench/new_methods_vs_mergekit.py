"""mergekit's other methods end to end on one workload: lines_fast (CPU backend) vs mergekit 0.1.5.

    python bench/new_methods_vs_mergekit.py --mergekit /tmp/mk-venv/bin/mergekit-yaml [--recipe llama-336m]
        [--methods slerp,nuslerp,...] [--repeats 3] [--out bench/results]

Writes the recipe's base and 3 bf16 fine-tunes (lines_fast.synth), then for each method one
mergekit-format YAML that both tools run as their own processes on the same files, tools
alternating, each timed with GNU time (wall seconds, peak RSS of that process alone), inputs read
once untimed first so both read from the page cache. slerp and nuslerp take two inputs (the base
and ft1; ft1 and ft2), the others all three; passthrough is a frankenmerge of two slices.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import gnu_time, machine, write_result  # noqa: E402
from lines_fast.synth import recipe, write_checkpoint_family  # noqa: E402


def configs(base: Path, fts: list[Path], layers: int) -> dict[str, dict]:
    common = {"dtype": "bfloat16"}
    b, f = str(base), [str(p) for p in fts]
    half = max(1, layers // 2)
    return {
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": f[0]}], "parameters": {"t": 0.3},
                  **common},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b,
                    "models": [{"model": f[0], "parameters": {"weight": 1.0}},
                               {"model": f[1], "parameters": {"weight": 2.0}}], **common},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": p} for p in f], **common},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}}
                                   for p in f], **common},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}}
                                        for p in f], **common},
        "della": {"merge_method": "della", "base_model": b,
                  "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for p in f],
                  **common},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f[0], "layer_range": [0, layers]}]},
            {"sources": [{"model": f[1], "layer_range": [layers - half, layers]}]}], **common},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", required=True)
    parser.add_argument("--recipe", default="llama-336m")
    parser.add_argument("--methods", default="slerp,nuslerp,model_stock,breadcrumbs,breadcrumbs_ties,della,passthrough")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per method (the median is reported)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    r = recipe(args.recipe)
    results = {"recipe": args.recipe, **machine(), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fam = write_checkpoint_family(tmp / "fam", r, n_finetunes=3, dtype=torch.bfloat16)
        for d in fam.models:   # into the page cache, untimed
            for f in d.glob("*.safetensors"):
                f.read_bytes()
        docs = configs(fam.base, list(fam.finetunes), r.layers)
        for k, name in enumerate(args.methods.split(",")):
            cfg = tmp / f"{name}.yml"
            cfg.write_text(yaml.safe_dump(docs[name], sort_keys=False))
            row = {tool: {"runs": []} for tool in ("lines_fast", "mergekit")}
            outs = {"lines_fast": tmp / f"{name}-lf", "mergekit": tmp / f"{name}-mk"}
            tools = [("lines_fast", [sys.executable, "-m", "lines_fast.cli", "merge", str(cfg), str(outs["lines_fast"]),
                                     "--device", "cpu", "--no-progress", "-q"]),
                     ("mergekit", [args.mergekit, str(cfg), str(outs["mergekit"]), "--no-copy-tokenizer"])]
            for r in range(args.repeats):
                for tool, cmd in (tools if (k + r) % 2 == 0 else tools[::-1]):   # alternate who goes first
                    shutil.rmtree(outs[tool], ignore_errors=True)   # each run writes a new directory, untimed removal
                    seconds, rss = gnu_time(cmd, tmp / f"{name}-{tool}.log")
                    row[tool]["runs"].append({"seconds": seconds, "peak_rss_gb": round(rss, 3)})
            for tool in row.values():   # the median run's time, the largest peak
                tool["seconds"] = statistics.median(run["seconds"] for run in tool["runs"])
                tool["peak_rss_gb"] = max(run["peak_rss_gb"] for run in tool["runs"])
            row["speedup"] = round(row["mergekit"]["seconds"] / row["lines_fast"]["seconds"], 2)
            results["methods"][name] = row
            print(f"{name}: lines_fast {row['lines_fast']['seconds']:.1f} s {row['lines_fast']['peak_rss_gb']:.2f} GB, "
                  f"mergekit {row['mergekit']['seconds']:.1f} s {row['mergekit']['peak_rss_gb']:.2f} GB "
                  f"(x{row['speedup']})", flush=True)
    write_result(args.out, f"new-methods-vs-mergekit-{args.recipe}", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
