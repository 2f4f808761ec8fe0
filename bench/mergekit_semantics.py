"""Do mergekit's configs mean the same thing here? Run both tools on the same files and compare.

    python bench/mergekit_semantics.py --mergekit /tmp/mk-venv/bin/mergekit-yaml [--recipe tiny] [--out DIR]

mergekit 0.1.5 lives in its own venv (never our dependency). For each config below both
tools merge the same synthetic bf16 checkpoints (lines_fast.synth) in float32:
- task_arithmetic with `normalize: true` and unequal weights, and linear with a base_model
  and a top-level weight (the base averaged in): deterministic, so the outputs must agree
  (max |diff| and the count of differing elements are reported).
- dare_linear and dare_ties with mergekit's defaults (rescale: true, normalize: false): the
  masks are random in both tools, so statistics are compared per tensor: the fraction of the
  output delta (θ − θ0) that is nonzero, and the L1 norm of the output delta; for one model
  with rescale true that norm must equal the input delta's (the L1 matching) in both.
Writes bench/results/mergekit-semantics-<recipe>-<stamp>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lines_fast.checkpoint import Checkpoint  # noqa: E402
from lines_fast.synth import recipe, write_checkpoint_family  # noqa: E402


def load(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {name: ckpt.tensor(name).float().clone() for name in ckpt.tensors if ckpt.tensors[name].is_float}


def configs(base: Path, fts: list[Path]) -> dict[str, dict]:
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    return {
        "task_arithmetic-normalize": {
            "merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 0.5, 0.25])],
            "parameters": {"normalize": True, "lambda": 1.0}, **common},
        "linear-with-base": {
            "merge_method": "linear", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 2.0, 1.0])],
            "parameters": {"weight": 0.5}, **common},
        "dare_linear-1model": {
            "merge_method": "dare_linear", "base_model": str(base),
            "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0, "density": 0.3}}], **common},
        "dare_linear": {
            "merge_method": "dare_linear", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in fts], **common},
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in fts], **common},
    }


def run(argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def compare(name: str, base: dict, inputs: list[dict], ours: dict, theirs: dict) -> dict:
    merged = [n for n in ours if n in theirs and n != "model.position_ids"]
    if name in ("task_arithmetic-normalize", "linear-with-base"):
        diffs = [(ours[n] - theirs[n]).abs() for n in merged]
        return {"kind": "exact", "tensors": len(merged),
                "elements_differing": int(sum(int((d != 0).sum()) for d in diffs)),
                "elements": int(sum(d.numel() for d in diffs)),
                "max_abs_diff": float(max(float(d.max()) for d in diffs))}
    rows = []
    for n in merged:
        d_ours, d_theirs = ours[n] - base[n], theirs[n] - base[n]
        d_in = sum(m[n] - base[n] for m in inputs)
        rows.append({"tensor": n, "numel": d_ours.numel(),
                     "kept_ours": float((d_ours != 0).float().mean()), "kept_mergekit": float((d_theirs != 0).float().mean()),
                     "l1_ratio_ours": float(d_ours.abs().sum() / d_in.abs().sum()),
                     "l1_ratio_mergekit": float(d_theirs.abs().sum() / d_in.abs().sum())})
    big = [r for r in rows if r["numel"] >= 10_000]
    def mean(key):
        return sum(r[key] for r in big) / len(big)
    return {"kind": "statistics", "tensors": len(rows), "tensors_summarized": len(big),
            "kept_fraction": {"lines_fast": mean("kept_ours"), "mergekit": mean("kept_mergekit")},
            "l1_ratio_out_over_sum_in": {"lines_fast": mean("l1_ratio_ours"), "mergekit": mean("l1_ratio_mergekit")},
            "per_tensor": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", required=True, help="mergekit-yaml of a mergekit 0.1.5 venv")
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    results = {"recipe": args.recipe, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": {}}
    mk_version = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    results["mergekit"] = mk_version
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fam = write_checkpoint_family(tmp / "fam", recipe(args.recipe), n_finetunes=3, dtype=torch.bfloat16, seed=0)
        base = load(fam.base)
        models = [load(p) for p in fam.finetunes]
        for name, doc in configs(fam.base, list(fam.finetunes)).items():
            cfg = tmp / f"{name}.yml"
            cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
            ours_dir, theirs_dir = tmp / f"{name}-lf", tmp / f"{name}-mk"
            t_ours = run([sys.executable, "-m", "lines_fast.cli", "merge", str(cfg), str(ours_dir), "--device", "cpu",
                          "--no-progress", "-q"], tmp / f"{name}-lf.log")
            t_theirs = run([args.mergekit, str(cfg), str(theirs_dir), "--no-copy-tokenizer"], tmp / f"{name}-mk.log")
            n_inputs = len(doc["models"])
            row = compare(name, base, models[:n_inputs], load(ours_dir), load(theirs_dir))
            row["seconds"] = {"lines_fast": round(t_ours, 2), "mergekit": round(t_theirs, 2)}
            row["config"] = {k: v for k, v in doc.items() if k not in ("base_model",)}
            results["cases"][name] = row
            summary = {k: v for k, v in row.items() if k not in ("per_tensor", "config")}
            print(f"{name}: {json.dumps(summary)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mergekit-semantics-{args.recipe}-{time.strftime('%Y%m%dT%H%M')}.json"
    for case in results["cases"].values():   # keep the file small: strip paths from configs
        for model in case["config"].get("models", []):
            model["model"] = Path(model["model"]).name
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
