"""The workload: a synthetic family generated once (or reused), one mergekit-format YAML per
method, and the check of every output against the reference's."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MergeInputError

DENSITY = 0.2
N_FINETUNES = 3
WORKLOAD_DTYPE = "bfloat16"
WORKLOAD_SEED = 0


def bench_methods() -> tuple[str, ...]:
    """The registered methods that merge the workload's three fine-tunes (not wise_ft's one)."""
    from .. import methods

    return tuple(m.name for m in methods.REGISTRY.values()
                 if m.min_models <= N_FINETUNES and (m.max_models is None or m.max_models >= N_FINETUNES))


@dataclass
class Workload:
    recipe: str
    params_per_model: int
    dtype: str
    n_finetunes: int
    bytes_per_model: int
    input_bytes: int           # every input tensor of base + fine-tunes: what one merge reads
    files: list[Path]
    base: Path
    finetunes: list[Path]
    reused: bool
    generate_seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["files"] = [str(f) for f in self.files]
        d["base"] = str(self.base)
        d["finetunes"] = [str(f) for f in self.finetunes]
        return d


def prepare_workload(recipe_name: str, workdir: Path) -> Workload:
    """Generate the family into workdir/inputs, or reuse it if a run left the same recipe there."""
    from ..checkpoint import Checkpoint
    from ..synth import FamilyPaths, checkpoint_bytes, param_count, recipe, write_checkpoint_family

    shape = recipe(recipe_name)
    stamp = {"recipe": asdict(shape), "dtype": WORKLOAD_DTYPE, "n_finetunes": N_FINETUNES,
             "seed": WORKLOAD_SEED}
    inputs = workdir / "inputs"
    marker = inputs / "workload.json"
    family = FamilyPaths(inputs / "base", [inputs / f"ft{i}" for i in range(1, N_FINETUNES + 1)])
    expected = checkpoint_bytes(shape, WORKLOAD_DTYPE)

    def intact() -> bool:
        try:
            if json.loads(marker.read_text()) != stamp:
                return False
            for d in family.models:
                with Checkpoint.open(d) as ckpt:
                    if ckpt.total_bytes() != expected:
                        return False
            return True
        except (OSError, ValueError, MergeInputError):
            return False

    reused = intact()
    seconds = 0.0
    if not reused:
        marker.unlink(missing_ok=True)  # a half-written family must never look reusable
        print(f"generating the {shape.name} workload (bf16 base + {N_FINETUNES} fine-tunes) in {inputs} ...",
              flush=True)
        t0 = time.perf_counter()
        write_checkpoint_family(inputs, shape, n_finetunes=N_FINETUNES, dtype=WORKLOAD_DTYPE, seed=WORKLOAD_SEED)
        seconds = time.perf_counter() - t0
        marker.write_text(json.dumps(stamp, indent=2) + "\n")
    files: list[Path] = []
    for d in family.models:
        with Checkpoint.open(d) as ckpt:
            files += ckpt.files
    return Workload(recipe=shape.name, params_per_model=param_count(shape), dtype=WORKLOAD_DTYPE,
                    n_finetunes=N_FINETUNES, bytes_per_model=expected, input_bytes=expected * (N_FINETUNES + 1),
                    files=files, base=family.base, finetunes=family.finetunes, reused=reused,
                    generate_seconds=seconds)


def write_configs(workload: Workload, methods: list[str], where: Path) -> dict[str, Path]:
    """One mergekit-format YAML per method; mergekit and lines_fast read the same file. Defaults
    are written out (normalize), so neither tool's defaults decide the comparison."""
    from .. import methods as registry
    from ..synth import FamilyPaths, write_yaml_config

    family = FamilyPaths(workload.base, workload.finetunes)

    def normalize(method: str):
        param = registry.get(method).param("normalize")
        return None if param is None else param.default

    return {m: write_yaml_config(where / f"{m}.yaml", family, method=m, density=DENSITY, lam=1.0,
                                 normalize=normalize(m), dtype="float32", out_dtype="bfloat16")
            for m in methods}


def verify(candidate: Path, reference: Path) -> dict:
    """Every tensor of `reference` against `candidate` under docs/methods.md's tolerances.

    Both are opened as memory maps and compared tensor by tensor, so this needs a few times
    the largest tensor in memory, not the model."""
    from ..checkpoint import Checkpoint
    from ..tolerance import compare

    result = {"ok": True, "tensors": 0, "elements": 0, "elements_different": 0, "max_abs_diff": 0.0,
              "worst_tensor": None, "failures": [], "missing": []}
    with Checkpoint.open(candidate) as got, Checkpoint.open(reference) as want:
        for name in want.tensors:
            if name not in got.tensors:
                result["missing"].append(name)
                continue
            verdict = compare(got.tensor(name), want.tensor(name))
            result["tensors"] += 1
            result["elements"] += verdict.numel
            result["elements_different"] += verdict.n_different
            if verdict.max_abs_diff > result["max_abs_diff"]:
                result["max_abs_diff"], result["worst_tensor"] = verdict.max_abs_diff, name
            if not verdict.ok:
                result["failures"].append(f"{name}: {verdict.why}")
            got.release(name)
            want.release(name)
    result["ok"] = not result["failures"] and not result["missing"]
    return result
