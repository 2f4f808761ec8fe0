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
- slerp (t = 0.3), nuslerp (weights 1, 2: flattened, per row of the last dim, per column of
  dim 0) and model_stock (per tensor, filter_wise): deterministic, but lines_fast takes the
  angle statistics in float64 and mergekit in float32, so the bf16 outputs may differ by a
  rounding step; reported: the fraction of elements that differ, max |diff|, and whether every
  difference is exactly 1 bf16 ulp (adjacent bf16 values). For slerp each output is also
  compared with a float64 slerp computed here, per row of dim 0 and over the whole tensor.
- slices: a passthrough frankenmerge (three slices from three models, scale 0.5), slerp over
  two slices with per-slice gradient positions, and a task_arithmetic list that names the base
  among the models: exact (slerp: rounding, as above); the output's tensor names and
  num_hidden_layers are compared too.
- breadcrumbs (density 0.9, gamma 0.01) and breadcrumbs_ties (density 0.8, gamma 0.05,
  unequal weights), mergekit's defaults (normalize, rescale false): the band drops the top
  floor(gamma d) |tau| of each tensor and keeps the next floor(density d); lines_fast keeps or
  drops every element tied at a threshold, mergekit's sort splits the ties. So each differing
  element must hold, in some model, a nonzero |tau| equal to that model's floor (the
  (floor(gamma d) + floor(density d))-th largest |tau|) or ceiling (the floor(gamma d)-th
  largest) for that tensor, both computed here from the inputs; the differing elements that
  do not are counted (expected 0), and so are the ties beyond each cut (the only elements
  that can differ). With density >= 1 mergekit leaves the tensor whole (no outlier removal
  either), so it has no thresholds. With ~30% of the synthetic deltas exactly 0, a floor past
  the nonzero values is 0, and ties at 0 change nothing.
Writes bench/results/mergekit-semantics-<recipe>-<stamp>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import math
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
        "slerp": {
            "merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
            "parameters": {"t": 0.3}, **common},
        "nuslerp": {
            "merge_method": "nuslerp", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 2.0])], **common},
        "nuslerp-no_base": {
            "merge_method": "nuslerp",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 2.0])], **common},
        "nuslerp-no_flatten": {
            "merge_method": "nuslerp", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 2.0])],
            "parameters": {"nuslerp_flatten": False}, **common},
        "nuslerp-no_flatten-row_wise": {
            "merge_method": "nuslerp", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, [1.0, 2.0])],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, **common},
        "model_stock": {
            "merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(p)} for p in fts],
            **common},
        "model_stock-filter_wise": {
            "merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(p)} for p in fts],
            "parameters": {"filter_wise": True}, **common},
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}} for p in fts],
            **common},
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.8, "gamma": 0.05}}
                       for p, w in zip(fts, [1.0, 0.5, 0.75])], **common},
        # slices: layer ranges renumbered (tiny has 2 layers: the output has 4)
        "passthrough-frankenmerge": {
            "merge_method": "passthrough", "parameters": {"scale": 0.5}, "slices": [
                {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(fts[1]), "layer_range": [1, 2]}]},
                {"sources": [{"model": str(fts[2]), "layer_range": [0, 1]}]}], **common},
        # The community's trick to make a repeated layer start as the identity: its attention and
        # MLP outputs zeroed (scale 0 where the name has o_proj or down_proj), the rest copied.
        "passthrough-zeroed-outputs": {
            "merge_method": "passthrough", "parameters": {"scale": [
                {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]},
            "slices": [{"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(fts[0]), "layer_range": [1, 2]}]}], **common},
        "slerp-slices-gradient": {
            "merge_method": "slerp", "base_model": str(base), "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(fts[0]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(fts[0]), "layer_range": [0, 2]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}, **common},
        "task_arithmetic-base-listed": {
            "merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(base)}] + [{"model": str(p), "parameters": {"weight": w}}
                                                for p, w in zip(fts, [1.0, 0.5, 0.25])], **common},
    }


EXACT = ("task_arithmetic-normalize", "linear-with-base", "passthrough-frankenmerge", "passthrough-zeroed-outputs",
         "task_arithmetic-base-listed")  # must agree bit for bit (elements_differing_in_bits: -0.0 vs +0.0 too)
# angle statistics in float64 here, in float32 in mergekit: rare 1-ulp differences expected
ROUNDING = ("slerp", "slerp-slices-gradient", "nuslerp", "nuslerp-no_base", "nuslerp-no_flatten", "nuslerp-no_flatten-row_wise", "model_stock",
            "model_stock-filter_wise")
BAND = ("breadcrumbs", "breadcrumbs_ties")  # differ only at ties at a threshold


def run(argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart a and b (bf16 values held as float32) are; +0 and -0 are 0 apart."""
    def ordinal(x):
        bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordinal(a) - ordinal(b)).abs()


def differences(ours: dict, theirs: dict, merged: list[str]) -> dict:
    diffs = {n: (ours[n] - theirs[n]).abs() for n in merged}
    steps = {n: ulps(ours[n], theirs[n]) for n in merged}
    differing = int(sum(int((d != 0).sum()) for d in diffs.values()))
    # The float32 bit patterns (bf16 widened exactly): also counts -0.0 against +0.0, equal as numbers.
    bits = int(sum(int((ours[n].view(torch.int32) != theirs[n].view(torch.int32)).sum()) for n in merged))
    elements = int(sum(d.numel() for d in diffs.values()))
    return {"tensors": len(merged), "elements": elements, "elements_differing": differing,
            "elements_differing_in_bits": bits,
            "fraction_differing": differing / elements,
            "max_abs_diff": float(max(float(d.max()) for d in diffs.values())),
            "max_ulps": int(max(int(u.max()) for u in steps.values())),
            "differing_by_1_ulp": int(sum(int((u == 1).sum()) for u in steps.values())),
            "tensors_differing": [n for n in merged if bool((diffs[n] != 0).any())]}


def band_thresholds(tau: torch.Tensor, density: float, gamma: float) -> tuple[float | None, float | None]:
    """(floor, ceiling) |tau| of breadcrumbs' band over one tensor, as mergekit 0.1.5 ranks it: the
    top floor(gamma d) go, the next floor(density d) stay. None where there is no such cut (no
    outliers removed, or density >= 1: mergekit returns the tensor as it is)."""
    d = tau.numel()
    if density >= 1:
        return None, None
    top, kept = int(math.floor(gamma * d)), int(math.floor(density * d))
    ranked = tau.abs().flatten().sort(descending=True).values
    floor = float(ranked[top + kept - 1]) if top + kept >= 1 else None
    ceiling = float(ranked[top - 1]) if top >= 1 else None
    return floor, ceiling


def explain_band(doc: dict, base: dict, inputs: list[dict], ours: dict, theirs: dict, merged: list[str]) -> dict:
    """Each differing element: does some model's nonzero |tau| there sit at its floor or ceiling?

    Also counts the ties beyond each cut (nonzero |tau| only, over every tensor): at the ceiling,
    the elements at it past the floor(gamma d) that mergekit drops (lines_fast drops them all);
    at the floor, those past the floor(gamma d) + floor(density d) that mergekit keeps (lines_fast
    keeps them all). Only those elements can differ, so their total bounds the differing count.
    """
    cut = [(float(m["parameters"]["density"]), float(m["parameters"]["gamma"])) for m in doc["models"]]
    totals = dict.fromkeys(("differing_at_floor_tie", "differing_at_ceiling_tie", "differing_unexplained",
                            "floor_ties_beyond_cut", "ceiling_ties_beyond_cut", "floors_at_zero"), 0)
    rows = []
    for n in merged:
        where = ours[n] != theirs[n]
        floor_hit = torch.zeros_like(where)
        ceiling_hit = torch.zeros_like(where)
        thresholds = []
        for m, (density, gamma) in zip(inputs, cut):
            magnitude = (m[n] - base[n]).abs()
            floor, ceiling = band_thresholds(magnitude, density, gamma)
            top, kept = int(math.floor(gamma * magnitude.numel())), int(math.floor(density * magnitude.numel()))
            thresholds.append({"floor": floor, "ceiling": ceiling})
            totals["floors_at_zero"] += floor == 0.0
            if floor is not None and floor > 0:
                floor_hit |= magnitude == floor
                totals["floor_ties_beyond_cut"] += int((magnitude >= floor).sum()) - (top + kept)
            if ceiling is not None and ceiling > 0:
                ceiling_hit |= magnitude == ceiling
                totals["ceiling_ties_beyond_cut"] += int((magnitude >= ceiling).sum()) - top
        unexplained = int((where & ~floor_hit & ~ceiling_hit).sum())
        totals["differing_at_floor_tie"] += int((where & floor_hit).sum())
        totals["differing_at_ceiling_tie"] += int((where & ceiling_hit).sum())
        totals["differing_unexplained"] += unexplained
        rows.append({"tensor": n, "numel": where.numel(), "differing": int(where.sum()), "unexplained": unexplained,
                     "thresholds": thresholds})
    totals["floors_at_zero"] = int(totals["floors_at_zero"])
    return {**totals, "thresholds_per_tensor": len(inputs), "per_tensor": rows}


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor, per_row: bool) -> torch.Tensor:
    """slerp from a toward b in float64, per row of dim 0 (a 1-d tensor is one row) or over the
    whole tensor; linear where the cosine is above 0.9995 (mergekit's threshold)."""
    x = a.double().reshape(a.shape[0] if per_row and a.dim() > 1 else 1, -1)
    y = b.double().reshape(x.shape)
    cos = ((x / x.norm(dim=1, keepdim=True)) * (y / y.norm(dim=1, keepdim=True))).sum(1, keepdim=True).clamp(-1, 1)
    angle = torch.acos(cos)
    c0 = torch.where(cos.abs() > 0.9995, 1 - t, torch.sin((1 - t) * angle) / torch.sin(angle))
    c1 = torch.where(cos.abs() > 0.9995, t, torch.sin(t * angle) / torch.sin(angle))
    return (c0 * x + c1 * y).reshape(a.shape).to(torch.bfloat16).float()


def slerp_references(t: float, base: dict, other: dict, ours: dict, theirs: dict, merged: list[str]) -> dict:
    """Elements of each tool's output that differ from the float64 slerp, per row and per tensor."""
    out = {}
    for granularity, per_row in (("per_row", True), ("per_tensor", False)):
        refs = {n: slerp_reference(t, base[n], other[n], per_row) for n in merged}
        out[granularity] = {tool: int(sum(int((result[n] != refs[n]).sum()) for n in merged))
                            for tool, result in (("lines_fast", ours), ("mergekit", theirs))}
    return out


def compare(name: str, doc: dict, base: dict, inputs: list[dict], ours: dict, theirs: dict) -> dict:
    merged = [n for n in ours if n in theirs and n != "model.position_ids"]
    if name in EXACT or name in ROUNDING:
        row = {"kind": "exact" if name in EXACT else "rounding", **differences(ours, theirs, merged)}
        row["all_differing_1_ulp"] = row["differing_by_1_ulp"] == row["elements_differing"]
        row["tensors_in_one_only"] = sorted(set(ours) ^ set(theirs))
        if doc["merge_method"] == "slerp" and "models" in doc:
            row["differing_from_float64_slerp"] = slerp_references(
                float(doc["parameters"]["t"]), base, inputs[0], ours, theirs, merged)
        return row
    if name in BAND:
        return {"kind": "band", **differences(ours, theirs, merged),
                **explain_band(doc, base, inputs, ours, theirs, merged)}
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
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
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
        cases = configs(fam.base, list(fam.finetunes))
        if args.cases:
            unknown = sorted(set(args.cases.split(",")) - set(cases))
            if unknown:
                parser.error(f"unknown cases {unknown}; the cases are {', '.join(cases)}")
            cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
        for name, doc in cases.items():
            cfg = tmp / f"{name}.yml"
            cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
            ours_dir, theirs_dir = tmp / f"{name}-lf", tmp / f"{name}-mk"
            t_ours = run([sys.executable, "-m", "lines_fast.cli", "merge", str(cfg), str(ours_dir), "--device", "cpu",
                          "--no-progress", "-q"], tmp / f"{name}-lf.log")
            t_theirs = run([args.mergekit, str(cfg), str(theirs_dir), "--no-copy-tokenizer"], tmp / f"{name}-mk.log")
            n_inputs = len(doc.get("models", []))
            row = compare(name, doc, base, models[:n_inputs], load(ours_dir), load(theirs_dir))
            row["seconds"] = {"lines_fast": round(t_ours, 2), "mergekit": round(t_theirs, 2)}
            row["config"] = {k: v for k, v in doc.items() if k not in ("base_model",)}
            row["num_hidden_layers"] = {tool: json.loads((d / "config.json").read_text()).get("num_hidden_layers")
                                        for tool, d in (("lines_fast", ours_dir), ("mergekit", theirs_dir))}
            results["cases"][name] = row
            summary = {k: v for k, v in row.items() if k not in ("per_tensor", "config", "tensors_differing")}
            print(f"{name}: {json.dumps(summary)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mergekit-semantics-{args.recipe}-{time.strftime('%Y%m%dT%H%M')}.json"
    for case in results["cases"].values():   # keep the file small: strip paths from configs
        for model in case["config"].get("models", []) + [
                src for sl in case["config"].get("slices", []) for src in sl["sources"]]:
            model["model"] = Path(model["model"]).name
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
