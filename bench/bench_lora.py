"""LoRA adapters merged as they are vs materialised first: time and peak memory.

    python bench/bench_lora.py [--recipe llama-336m] [--adapters 4] [--rank 16] [--out bench/results]

Writes a bf16 base of the recipe and N PEFT LoRA adapters (rank r on q, k, v, o, gate, up and
down of every layer, random bf16 factors), then times, each as its own process with peak RSS
(/usr/bin/time-style, from the child's rusage):
- `lines-fast merge` TIES (density 0.2) with the adapters as models (tau = B A on the fly);
- materialising each adapter into a full bf16 fine-tune (W + scaling B A, what PEFT's
  merge_and_unload writes), then the same TIES merge of those fine-tunes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import gnu_time, machine, write_result  # noqa: E402
from lines_fast.checkpoint import Checkpoint  # noqa: E402
from lines_fast.synth import recipe, write_checkpoint_family  # noqa: E402
from lines_fast.writer import ShardedWriter  # noqa: E402

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MATERIALISE = """
import json, sys, torch
from pathlib import Path
from lines_fast.checkpoint import Checkpoint
from lines_fast.writer import ShardedWriter
base_dir, adapter_dir, out = map(Path, sys.argv[1:4])
cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
scaling = cfg["lora_alpha"] / cfg["r"]
with Checkpoint.open(base_dir) as base, Checkpoint.open(adapter_dir / "adapter_model.safetensors") as ad:
    w = ShardedWriter(out, [(n, i.dtype, i.shape) for n, i in base.tensors.items()], max_shard_size=1 << 40,
                      metadata={"lines_fast_synthetic": "materialised"}, durable=False)
    for name in w.pending_names():
        key = "base_model.model." + name[:-len(".weight")] + ".lora_A.weight"
        t = base.tensor(name)
        if key in ad.tensors:
            a, b = ad.tensor(key).float(), ad.tensor(key.replace("lora_A", "lora_B")).float()
            t = (t.float() + scaling * (b @ a)).to(t.dtype)
        w.write(name, t)
    w.finish(aux_files=base.aux_files())
"""


def write_adapter(folder: Path, base: Checkpoint, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    entries, values = [], {}
    for name, info in base.tensors.items():
        if name.endswith(".weight") and any(t in name for t in TARGETS):
            module = "base_model.model." + name[:-len(".weight")]
            out_f, in_f = info.shape
            values[f"{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
            values[f"{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in values.items()]
    w = ShardedWriter(folder, entries, max_shard_size=1 << 40, metadata={"lines_fast_synthetic": "lora"}, durable=False)
    for k in w.pending_names():
        w.write(k, values[k])
    w.finish()
    (folder / "model.safetensors").rename(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [t.split(".")[-1] for t in TARGETS]}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llama-336m")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "lines_fast.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fam = write_checkpoint_family(tmp / "fam", recipe(args.recipe), n_finetunes=1, dtype=torch.bfloat16)
        adapters = []
        with Checkpoint.open(fam.base) as base:
            for i in range(args.adapters):
                write_adapter(tmp / f"adapter{i}", base, args.rank, seed=i)
                adapters.append(tmp / f"adapter{i}")
        merge_args = ["merge", "--method", "ties", "--density", "0.2", "--base", str(fam.base), "--device", "cpu",
                      "--no-progress", "-q"]
        adapter_run = gnu_time(cli + merge_args + [a for p in adapters for a in ("--model", str(p))] + ["-o", str(tmp / "m1")])
        materialised, mat_seconds, mat_peak = [], 0.0, 0.0
        for i, adapter in enumerate(adapters):
            seconds, peak = gnu_time([sys.executable, "-c", MATERIALISE, str(fam.base), str(adapter), str(tmp / f"full{i}")])
            mat_seconds, mat_peak = mat_seconds + seconds, max(mat_peak, peak)
            materialised.append(tmp / f"full{i}")
        full_run = gnu_time(cli + merge_args + [a for p in materialised for a in ("--model", str(p))] + ["-o", str(tmp / "m2")])
        disk = {"adapters_gb": sum(f.stat().st_size for p in adapters for f in p.iterdir()) / 1e9,
                "materialised_gb": sum(f.stat().st_size for p in materialised for f in p.iterdir()) / 1e9}
    result = {
        "recipe": args.recipe, "adapters": args.adapters, "rank": args.rank, "targets": list(TARGETS),
        "method": "ties density 0.2, tensor scope, bf16", "device": "cpu",
        "adapters_as_models": {"seconds": round(adapter_run[0], 2), "peak_rss_gb": round(adapter_run[1], 2)},
        "materialise_then_merge": {"materialise_seconds": round(mat_seconds, 2), "merge_seconds": round(full_run[0], 2),
                                   "total_seconds": round(mat_seconds + full_run[0], 2),
                                   "peak_rss_gb": round(max(mat_peak, full_run[1]), 2)},
        "disk_gb": {k: round(v, 3) for k, v in disk.items()},
        **machine(),
    }
    print(json.dumps(result, indent=1))
    write_result(args.out, f"lora-{args.recipe}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
