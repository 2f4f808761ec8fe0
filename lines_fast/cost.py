"""`lines-fast plan`: what a merge will cost, before running it.

From a CONFIG (headers only) or a shape recipe (no data at all, e.g. llama3-70b) it lists
the passes the engine will make (lines_fast.planning), the bytes each reads and writes,
peak host and GPU memory, and a predicted time from given bandwidths. The prediction is a
bottleneck model: within a pass, reading, host-to-device copies, compute and writing
overlap, so a pass takes as long as its slowest stage.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path


from .backends.base import STREAM_MIN

from .config import DTYPES, MergeConfig, load_yaml
from .dtypes import DType
from .engine import cuda_available
from .errors import MergeInputError
from .writer import group_by_size, parse_size
from .plan import ElementPlan
from .planning import Pass, plan_passes
from .spec import LinesSpec, MethodSpec, is_auto, make_spec

# Defaults: a local NVMe Gen4 drive, PCIe Gen5 x16 with copy engines, H100 HBM3 (FACTS.md),
# and the CPU backend's measured throughput on 2 cores (README, bench/results).
DEFAULT_READ_GBPS = 5.0
DEFAULT_PCIE_GBPS = 50.0
DEFAULT_HBM_GBPS = 3000.0
DEFAULT_CPU_GBPS = 1.0
CPU_CHUNK_BYTES = (1 << 18) * 4          # CpuBackend.DEFAULT_CHUNK float32 elements
GPU_STAGE_BYTES = 256 << 20              # TritonBackend's staging chunk
GPU_STAGES = 3                           # read / compute / write in flight
PROCESS_BASELINE_BYTES = 400 << 20       # Python + torch, measured RSS of an idle import


@dataclass
class TensorCost:
    name: str
    numel: int
    in_bytes: int       # base + all models, one read
    out_bytes: int


@dataclass
class PassCost:
    step: Pass
    read_bytes: int
    write_bytes: int
    seconds: float
    bottleneck: str


def _estimate(spec: MethodSpec, tensors: list[TensorCost], device: str, read_gbps: float, pcie_gbps: float,
              hbm_gbps: float, cpu_gbps: float) -> tuple[list[PassCost], int, int]:
    passes = plan_passes(spec)
    total_in = sum(t.in_bytes for t in tensors)
    total_out = sum(t.out_bytes for t in tensors)
    # A per-tensor statistic the merge pass finds first (L1 rescale factors, the Gram weights of
    # slerp / nuslerp / model_stock) reads each tensor once more, from the page cache: compute,
    # not storage.
    _, factors, group_weights = ElementPlan.from_spec(spec).missing(None)
    in_pass_reads = 1 + int(factors) + int(group_weights)
    costs = []
    for p in passes:
        write = total_out if p.writes else 0
        compute_reads = in_pass_reads if p.writes else 1
        # Reads and writes share the drive, so the storage stage carries both.
        stages = {"storage": (total_in + write) / (read_gbps * 1e9)}
        if device == "cuda":
            stages["PCIe host-to-device"] = total_in / (pcie_gbps * 1e9)
            stages["PCIe device-to-host"] = write / (pcie_gbps * 1e9)
            stages["HBM"] = (total_in * compute_reads + write) / (hbm_gbps * 1e9)
        else:
            stages["CPU compute"] = total_in * compute_reads / (cpu_gbps * 1e9)
        bottleneck = max(stages, key=stages.get)
        costs.append(PassCost(p, total_in, write, stages[bottleneck], bottleneck))
    n_inputs = spec.n_models + (1 if spec.uses_base else 0)
    # Tensors of STREAM_MIN elements or more are streamed chunk by chunk on the CPU backend (inputs
    # released behind each chunk, output written piece by piece): only smaller ones count whole.
    whole = [t for t in tensors if t.numel < STREAM_MIN] or [min(tensors, key=lambda t: t.numel)]
    largest_in = max(t.in_bytes for t in whole)
    largest_out = max(t.out_bytes for t in whole)
    # Host: the current tensor's mapped input pages and the one read ahead, its output, scratch.
    host = 2 * largest_in + largest_out + (n_inputs + 5) * CPU_CHUNK_BYTES + PROCESS_BASELINE_BYTES
    largest_in = max(t.in_bytes for t in tensors)
    largest_out = max(t.out_bytes for t in tensors)
    gpu = 0
    if device == "cuda":
        host = 2 * largest_in + largest_out + GPU_STAGES * GPU_STAGE_BYTES + PROCESS_BASELINE_BYTES
        gpu = GPU_STAGES * (n_inputs + 1) * GPU_STAGE_BYTES
    return costs, host, gpu


def _tensors_from_recipe(recipe_name: str, n_models: int, dtype: DType, uses_base: bool) -> list[TensorCost]:
    from .synth import recipe, tensor_shapes

    shapes = tensor_shapes(recipe(recipe_name))
    n_inputs = n_models + (1 if uses_base else 0)
    out = []
    for name, shape in shapes:
        numel = math.prod(shape)
        out.append(TensorCost(name, numel, numel * dtype.itemsize * n_inputs, numel * dtype.itemsize))
    return out


def _tensors_from_headers(config: MergeConfig) -> list[TensorCost]:
    """The tensor list of a config with Hub models not in the cache, from their safetensors headers."""
    from . import hub
    from .checkpoint import Checkpoint

    if config.slices:
        raise MergeInputError(f"{config.source}: plan reads a sliced config's layers from local checkpoints; "
                              "download the Hub models first (huggingface-cli download ORG/NAME).")
    tables = []
    for path in ([config.base] if config.base else []) + list(config.models):
        if hub.remote(path):
            tables.append(hub.header_tensors(path, config.source))
        else:
            with Checkpoint.open(path) as ckpt:
                tables.append(dict(ckpt.tensors))
    return _costs(tables, config)


def _costs(tables: list[dict], config: MergeConfig) -> list[TensorCost]:
    """Each tensor of the first input (the output's), its bytes read over every input's table
    (name -> TensorInfo) and written in the output dtype."""
    out = []
    for name, info in tables[0].items():
        out_dtype = config.out_dtype if (config.out_dtype and info.is_float) else info.dtype
        out.append(TensorCost(name, info.numel, sum(t[name].nbytes for t in tables if name in t),
                              info.numel * out_dtype.itemsize))
    return out


def _tensors_from_config(config: MergeConfig) -> list[TensorCost]:
    from . import hub
    from .engine import _plan_tensors, open_inputs

    if any(hub.remote(p) for p in ([config.base] if config.base else []) + list(config.models)):
        return _tensors_from_headers(config)
    inputs = open_inputs(config)
    try:
        # The merge's own check that the inputs agree (names, shapes, dtypes; the values of small
        # integer tensors): a plan passes only what the merge would start on.
        _plan_tensors(config, inputs, lambda _: None)
        return _costs([c.tensors for c in inputs.all()], config)
    finally:
        inputs.close()


def _realigned_bytes(config: MergeConfig) -> int:
    """Host memory of the realigned vocabulary rows (tokenizer_source): one vocabulary tensor of
    every input, held whole while it is merged (lines_fast/realign.py)."""
    from . import hub
    from .engine import open_inputs
    from .realign import RealignedCheckpoint

    if any(hub.remote(p) for p in ([config.base] if config.base else []) + list(config.models)):
        return 0   # headers only: no tokenizer to read yet
    inputs = open_inputs(config, log=lambda _: None)
    try:
        held = [c for c in inputs.all() if isinstance(c, RealignedCheckpoint)]
        if not held:
            return 0
        names = held[0].realigned_names
        return max(sum(c.tensors[n].nbytes for c in held) for n in names)
    finally:
        inputs.close()


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def count_text(n: int) -> str:
    """336M, 70.6B, 103K: a count of parameters or elements as people say it."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def plan_command(args) -> int:
    if args.world_size < 1:
        raise MergeInputError(f"--world-size must be at least 1 (the number of torchrun ranks), got {args.world_size}.")
    lines_alpha = getattr(args, "lines_alpha", None)
    recipe_only = [flag for flag, value in (("--recipe", args.recipe), ("--method", args.method),
                                            ("--models", args.models), ("--dtype", args.dtype),
                                            ("--trim-scope", args.trim_scope), ("--lines-alpha", lines_alpha))
                   if value is not None]
    if args.config and recipe_only:
        verb = "describes" if len(recipe_only) == 1 else "describe"
        raise MergeInputError(f"plan {args.config}: {', '.join(recipe_only)} {verb} a merge without a config "
                              "(with --recipe); the config already says what it merges. Edit the config, or "
                              "drop it and price a recipe: lines-fast plan --recipe llama3-70b --method ties.")
    if args.config:
        from . import hub

        with hub.headers_only():   # Hub models: their headers, not their weights
            config = load_yaml(Path(args.config))
        for notice in config.notices:   # what the merge's log would say about the config first
            print(notice, file=sys.stderr)
        spec = config.method_spec()
        tensors = _tensors_from_config(config)
        what = f"{args.config}: {config.method}, {len(config.models)} fine-tuned model(s)"
    elif args.recipe:
        from . import methods

        method = methods.get(args.method or "ties", "--method")
        with_base = method.inputs is methods.Inputs.BASE_AND_MODELS   # slerp's base is one of its models
        # By default as many fine-tunes as the method takes, up to 3.
        models = args.models if args.models is not None else max(method.min_models - with_base,
                                                                 min(3, (method.max_models or 3) - with_base))
        dtype = args.dtype or "bfloat16"
        trim_scope = args.trim_scope or "tensor"
        lines = None
        if lines_alpha is not None:
            try:
                lines = LinesSpec(alpha="auto" if is_auto(lines_alpha) else float(lines_alpha), beta=1.0)
            except ValueError:
                raise MergeInputError(f"--lines-alpha must be a number or auto, got {lines_alpha!r}.") from None
        values = {"density": 0.2} if method.takes("density") else {}
        values.update({p.name: 0.5 for p in method.params if p.required})   # priced at a midpoint (slerp's t)
        if method.takes("trim_scope"):
            values["trim_scope"] = trim_scope
        elif trim_scope != "tensor":
            raise MergeInputError(f"--trim-scope: {method.name} does not trim by magnitude.")
        inputs = models + with_base
        spec = make_spec(method.name, inputs, values=values, lines=lines, where="plan")
        tensors = _tensors_from_recipe(args.recipe, inputs, DTYPES[dtype], spec.uses_base)
        what = f"recipe {args.recipe}: {method.name}, {models} fine-tuned model{'s' if models != 1 else ''}, {dtype}"
    else:
        raise MergeInputError("plan needs a CONFIG.yml or --recipe NAME (tiny, llama-336m, llama-1b, llama3-70b).")
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    read = args.read_gbps or DEFAULT_READ_GBPS
    pcie = args.pcie_gbps or DEFAULT_PCIE_GBPS
    hbm = args.hbm_gbps or DEFAULT_HBM_GBPS
    cpu = args.cpu_gbps or DEFAULT_CPU_GBPS
    costs, host, gpu = _estimate(spec, tensors, device, read, pcie, hbm, cpu)
    realigned = _realigned_bytes(config) if args.config and config.tokenizer is not None else 0
    host += realigned
    params = sum(t.numel for t in tensors)
    print(f"plan for {what}")
    print(f"  {len(tensors)} tensors, {count_text(params)} parameters per model; "
          f"largest tensor {count_text(max(t.numel for t in tensors))} elements")
    print(f"  device {device}; bandwidths: read {read:g} GB/s"
          + (f", PCIe {pcie:g} GB/s, HBM {hbm:g} GB/s" if device == "cuda" else f", CPU backend {cpu:g} GB/s of input"))
    print(f"  {'pass':<12} {'reads':>12} {'writes':>12} {'predicted':>11}  bottleneck / why")
    for c in costs:
        print(f"  {c.step.name:<12} {_gb(c.read_bytes):>12} {_gb(c.write_bytes):>12} {c.seconds:>10.1f}s  "
              f"{c.bottleneck}: {c.step.why}")
    total_s = sum(c.seconds for c in costs)
    print(f"  total: {len(costs)} pass(es), reads {_gb(sum(c.read_bytes for c in costs))}, writes "
          f"{_gb(sum(c.write_bytes for c in costs))}, predicted {total_s:,.0f} s ({total_s / 60:.1f} min)")
    refine = [c for c in costs if c.step.name == "refine"]
    if refine:
        without = total_s - refine[0].seconds
        print(f"  without the refine pass (skipped when the magnitudes pass settles every threshold, "
              f"usual for bf16): {without:,.0f} s ({without / 60:.1f} min)")
    print(f"  peak host memory ~{_gb(host)}" + (f", peak GPU memory ~{_gb(gpu)}" if device == "cuda" else "")
          + (f" (of which {_gb(realigned)}: every input's realigned embedding rows, held whole)" if realigned else ""))
    if args.world_size > 1:
        _print_world(spec, tensors, device, (read, pcie, hbm, cpu), args.world_size, parse_size(args.max_shard_size))
    return 0


def _print_world(spec: MethodSpec, tensors: list[TensorCost], device: str, bandwidths, world: int,
                 max_shard_size: int) -> None:
    """A distributed run: whole shards per rank (the engine's assignment); every pass ends when its
    slowest rank does (the ranks exchange statistics there)."""
    from .distributed import assign_shards

    shards = group_by_size([t.out_bytes for t in tensors], max_shard_size)
    owners = assign_shards([sum(tensors[i].in_bytes for i in shard) for shard in shards], world)
    per_rank = []
    for rank in range(world):
        mine = [tensors[i] for shard, owner in zip(shards, owners) if owner == rank for i in shard]
        costs = _estimate(spec, mine, device, *bandwidths)[0] if mine else []
        per_rank.append((mine, costs, owners.count(rank)))
    print(f"  {world} ranks, torchrun or merge --workers ({len(shards)} output shard(s) of at most {_gb(max_shard_size)}, whole "
          "shards per rank; bandwidths are each rank's own: ranks sharing one drive or link share its bandwidth)")
    for rank, (mine, costs, n_shards) in enumerate(per_rank):
        print(f"    rank {rank}: {n_shards} shard(s), {len(mine)} tensors, reads "
              f"{_gb(sum(c.read_bytes for c in costs))}, predicted {sum(c.seconds for c in costs):,.1f} s")
    n_passes = max(len(c) for _, c, _ in per_rank)
    total = sum(max((c[p].seconds for _, c, _ in per_rank if c), default=0.0) for p in range(n_passes))
    slowest = max(range(world), key=lambda r: sum(c.seconds for c in per_rank[r][1]))
    print(f"  distributed total: predicted {total:,.1f} s ({total / 60:.1f} min); the slowest rank is rank {slowest}"
          + ("; some ranks have no shard: a smaller --max-shard-size spreads the work" if len(shards) < world else ""))
