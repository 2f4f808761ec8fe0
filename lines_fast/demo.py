"""`lines-fast demo`: the main job on a built-in example, checked against the reference.

Builds a small Llama-shaped base and three realistic fine-tunes (bf16, depth-dependent
deltas, ~30% exact zeros) in a temporary directory, merges them with TIES (density 0.2) +
LiNeS (alpha auto, beta 1.0) on the best backend here, then recomputes the merge with the
pure-PyTorch reference and compares every tensor within the tolerances of docs/methods.md.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import MergeConfig, validate
from .engine import Engine
from .reference import merge_state_dicts
from .errors import MergeInputError
from .spec import LinesSpec
from .synth import recipe as get_recipe, write_checkpoint_family
from .tolerance import compare

DENSITY = 0.2
LINES = LinesSpec(alpha="auto", beta=1.0)


def _load(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {name: ckpt.tensor(name).clone() for name in ckpt.tensors}


def run_demo(recipe: str = "tiny", device: str = "auto", keep: str | None = None) -> int:
    shape = get_recipe(recipe)
    if keep and Path(keep).exists() and not Path(keep).is_dir():
        raise MergeInputError(f"demo --keep {keep}: that is a file; give a directory to keep the example's "
                              "checkpoints and merge in (it is created if missing).")
    with tempfile.TemporaryDirectory(prefix="lines-fast-demo-") as tmp:
        work = Path(keep) if keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"building a {shape.name} Llama-shaped base and 3 fine-tunes (bf16) in {work} ...")
        t0 = time.perf_counter()
        family = write_checkpoint_family(work / "inputs", shape, n_finetunes=3, dtype=torch.bfloat16, seed=0,
                                         int_tensor=True)
        print(f"  built in {time.perf_counter() - t0:.1f} s")
        config = validate(MergeConfig(method="ties", base=family.base, models=list(family.finetunes),
                                      params={"density": DENSITY}, lines=LINES, source="demo"))
        out = work / "merged"
        print(f"merging: ties, density {DENSITY}, tensor scope, LiNeS alpha auto, beta {LINES.beta} ...")
        result = Engine(config, out, device=device, force=True).run()
        print(result.summary() + ("" if keep else "\n  (a temporary directory, removed at the end: --keep DIR keeps it)"))

        print("checking against the pure-PyTorch reference ...")
        base = _load(family.base)
        models = [_load(p) for p in family.finetunes]
        expected = merge_state_dicts(base, models, "ties", density=DENSITY, lines=LINES)
        merged = _load(out)
        worst_name, worst, failures, different = None, 0.0, [], 0
        for name, ref in expected.items():
            verdict = compare(merged[name], ref)
            different += verdict.n_different
            if verdict.max_abs_diff > worst:
                worst_name, worst = name, verdict.max_abs_diff
            if not verdict.ok:
                failures.append(f"{name}: {verdict.why}")
        total = sum(t.numel() for t in expected.values())
        print(f"  all {len(expected)} output tensors (the merged ones and those copied from the base), {total:,} elements: {different} differ from the reference, "
              f"largest deviation {worst:.3g}" + (f" ({worst_name})" if worst_name else ""))
        if failures:
            print("  OUTSIDE TOLERANCE:\n    " + "\n    ".join(failures))
            return 1
        print("  within the tolerances of docs/methods.md: OK")
        if keep:
            print(f"kept the example and the merge in {work}")
        return 0
