"""Compile every kernel variant for an NVIDIA GPU without one, and report what the compiler made of it.

    python bench/compile_check.py [--arch 90] [--json OUT.json]

For each variant (method switches, dtypes, model count) Triton compiles the kernel ahead of
time for the target (sm_90 = H100 by default) with the same launch options the backend
uses. The bundled cuobjdump then reports registers per thread and local memory (spills) of
the cubin, and the PTX is scanned for the width of its global loads. What this catches on a machine without a GPU:
a kernel that no longer compiles (the interpreter accepts things the compiler refuses),
register spills, and loads that lost their 16-byte vectorization (memory-bound kernels
that issue 2-byte loads fall far short of HBM bandwidth). tests/test_compile.py runs it.

It must run in a process where TRITON_INTERPRET is unset: the interpreter replaces the
kernels with Python functions that cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@dataclass
class Variant:
    name: str
    kernel: str                  # "merge" or "histogram"
    constexprs: dict
    dtypes: dict                 # pointer argument -> Triton element type
    num_warps: int
    max_registers: int = 128     # above this, occupancy drops below what streaming needs

    @property
    def inputs(self) -> int:
        """Tensors the kernel streams: every one of them must get wide loads."""
        return self.constexprs["N"] + (1 if self.constexprs.get("HAS_BASE", True) else 0)


def _merge_variant(name, spec, *, l1=False, bf16=True, max_registers=128) -> Variant:
    """The fused kernel as the backend launches it for `spec` (a MethodSpec): the plan's switches."""
    from lines_fast.backends.triton_backend import import_kernels
    from lines_fast.plan import ElementPlan

    kmerge, _ = import_kernels()
    plan = ElementPlan.from_spec(spec)
    elem = "i16" if bf16 else "fp32"  # bf16 travels as int16 bit patterns
    return Variant(
        name, "merge",
        dict(**kmerge.plan_switches(plan), L1=l1, TASK_SUM=l1 and plan.uses_base, CHECK_FINITE=not l1,
             GROUP_ROWS=plan.grouped,
             BASE_BF16=bf16, MODELS_BF16=bf16, OUT_BF16=bf16, BLOCK=1024),
        dict(out_ptr="fp64" if l1 else elem, base_ptr=elem, models_ptr=elem),
        kmerge.NUM_WARPS_DROP if plan.drops else kmerge.NUM_WARPS, max_registers)


def variants() -> list[Variant]:
    """Every registered method at N = 3 (each parameter at its default, density 0.2), plus the
    extremes: N = 8, fp32, the L1 (alpha auto) variant and each rescale mode."""
    from lines_fast import methods
    from lines_fast.backends.triton_backend import import_kernels
    from lines_fast.plan import ElementPlan
    from lines_fast.spec import LinesSpec, make_spec

    _, kselect = import_kernels()
    NUM_WARPS = import_kernels()[0].NUM_WARPS
    HOT_SLOTS, ITERS = kselect.HOT_SLOTS, kselect.ITERS

    def spec(method, n=3, lines=None, **values):
        definition = methods.get(method)
        if definition.takes("density"):
            values.setdefault("density", 0.2)
        for param in definition.params:
            if param.required:
                values.setdefault(param.name, 0.5)
        return make_spec(method, n, values=values, lines=lines)

    # DARE keeps Philox state per element: more registers are expected (8 warps).
    budget = {"dare_ties": 168, "dare_linear": 168, "della": 168, "della_linear": 168}
    sizes = {m.name: min(3, m.max_models or 3) for m in methods.REGISTRY.values()}
    kmerge = import_kernels()[0]
    merges = [_merge_variant(f"{name} bf16 N={n}", spec(name, n), max_registers=budget.get(name, 128))
              for name, n in sizes.items() if kmerge.unsupported(ElementPlan.from_spec(spec(name, n))) is None]
    merges += [
        _merge_variant("linear (no base) bf16 N=3", spec("linear")),
        # N = 8 holds 9 loads of 16 bytes per thread in flight: plenty at 3 blocks per SM.
        _merge_variant("ties bf16 N=8", spec("ties", 8), max_registers=168),
        _merge_variant("ties fp32 N=3", spec("ties"), bf16=False),
        _merge_variant("ties rescale bf16 N=3", spec("ties", rescale=True)),
        _merge_variant("ties consensus bf16 N=3", spec("ties", consensus={"k": 2})),
        _merge_variant("dare_linear inverse bf16 N=8", spec("dare_linear", 8, rescale="inverse"), max_registers=255),
        _merge_variant("ties L1 (alpha auto) bf16 N=3", spec("ties"), l1=True),
        _merge_variant("linear + LiNeS L1 bf16 N=3", spec("linear", lines=LinesSpec("auto", 1.0)), l1=True),
    ]
    return merges + [
        Variant("histogram bf16 N=3", "histogram",
                dict(N=3, NP=4, REFINE=False, BASE_BF16=True, MODELS_BF16=True, BLOCK=1024, ITERS=ITERS,
                     HOT=HOT_SLOTS),
                dict(base_ptr="i16", models_ptr="i16"), NUM_WARPS),
        Variant("histogram bf16 N=3, 128 slots", "histogram",
                dict(N=3, NP=4, REFINE=False, BASE_BF16=True, MODELS_BF16=True, BLOCK=1024, ITERS=ITERS, HOT=128),
                dict(base_ptr="i16", models_ptr="i16"), NUM_WARPS),
        Variant("histogram bf16 N=8", "histogram",
                dict(N=8, NP=8, REFINE=False, BASE_BF16=True, MODELS_BF16=True, BLOCK=1024, ITERS=ITERS,
                     HOT=HOT_SLOTS),
                dict(base_ptr="i16", models_ptr="i16"), NUM_WARPS),
        Variant("histogram refine fp32 N=1", "histogram",
                dict(N=1, NP=1, REFINE=True, BASE_BF16=False, MODELS_BF16=False, BLOCK=1024, ITERS=ITERS,
                     HOT=HOT_SLOTS),
                dict(base_ptr="fp32", models_ptr="fp32"), NUM_WARPS),
    ]


# Runtime argument types, as Triton's launcher would specialize them (ints: i64 where they
# can pass 2^31 or are seeds; pointers 16-byte aligned, as every staging view is).
_MERGE_ARGS = dict(out_ptr=None, base_ptr=None, models_ptr=None, table_ptr="*fp32", partial_ptr="*fp64",
                   task_partial_ptr="*fp64", flags_ptr="*i32", group_weights_ptr="*fp32", drop_ptr="*fp32",
                   n_elements="i64", model_stride="i64", drop_stride="i64", elem_offset="i64", seed="i64",
                   stream_id="i64", scale="fp32", weight_sum="fp32", n_groups="i64", group_len="i64",
                   tall_k="i32", zero_sign="fp32")
_HIST_ARGS = dict(hist_ptr="*i32", slot_of_bin_ptr="*i16", bin_of_slot_ptr="*i32", base_ptr=None, models_ptr=None,
                  model_stride="i64", n_elements="i64", block_stride="i64", hist_row_stride="i32", bucket="i32")
_DIVISIBLE = ("n_elements", "model_stride", "drop_stride", "block_stride")  # multiples of 16 on the benchmark's shapes


def compile_variant(variant: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lines_fast.backends.triton_backend import import_kernels

    kmerge, kselect = import_kernels()
    fn = kmerge._fused_merge_kernel if variant.kernel == "merge" else kselect._magnitude_hist_kernel
    args = dict(_MERGE_ARGS if variant.kernel == "merge" else _HIST_ARGS)
    for arg, elem in variant.dtypes.items():
        args[arg] = "*" + elem
    signature = {name: args.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in signature.items() if kind.startswith("*") or name in _DIVISIBLE}
    source = ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs, attrs=attrs)
    options = {"num_warps": variant.num_warps, "enable_fp_fusion": False}  # as the launchers compile them
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory bytes (spills) of a cubin, from the bundled cuobjdump."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump failed:\n{proc.stderr}")
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", proc.stdout))
    return {"registers": int(usage["REG"]), "local_bytes": int(usage["LOCAL"]) + int(usage["STACK"]),
            "shared_bytes": int(usage["SHARED"])}


def load_widths(ptx: str) -> dict:
    """How many global loads of each vector width the PTX issues (v4.b32 = 16 bytes per thread)."""
    widths: dict[str, int] = {}
    for match in re.finditer(r"ld\.global(?:\.[a-z]+)*?(\.v[248])?\.(b|u|s|f)(16|32|64)\b", ptx):
        vector = match.group(1) or ".v1"
        key = f"{vector[1:]}.{match.group(3)}bit"
        widths[key] = widths.get(key, 0) + 1
    return widths


def check(arch: int = 90) -> list[dict]:
    import torch
    import triton

    rows = []
    for variant in variants():
        compiled = compile_variant(variant, arch)
        ptx = compiled.asm["ptx"]
        report = resource_usage(compiled.asm["cubin"])
        widths = load_widths(ptx)
        # Data loads must be 16 bytes per thread (v4.b32, or v2.b32 = 8 bytes with 8 warps), at
        # least one per streamed tensor (a model row that lost its alignment would show here).
        wide = sum(count for key, count in widths.items() if key in ("v4.32bit", "v2.32bit", "v2.64bit"))
        problems = []
        if report["local_bytes"]:
            problems.append(f"{report['local_bytes']} bytes of local memory (spills)")
        if report["registers"] > variant.max_registers:
            problems.append(f"{report['registers']} registers > {variant.max_registers}")
        if wide < variant.inputs:
            problems.append(f"{wide} vectorized global loads for {variant.inputs} streamed tensors")
        rows.append({"variant": variant.name, "arch": f"sm_{arch}", "num_warps": variant.num_warps, **report,
                     "global_loads": widths, "ok": not problems, "problems": problems,
                     "triton": triton.__version__, "torch": torch.__version__, "constexprs": variant.constexprs})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted, nothing to compile", file=sys.stderr)
        return 2
    rows = check(args.arch)
    print(f"{'variant':<32}{'warps':>6}{'regs':>6}{'local B':>9}  global loads")
    for row in rows:
        loads = ", ".join(f"{k}:{v}" for k, v in sorted(row["global_loads"].items()))
        flag = "" if row["ok"] else "   <-- " + "; ".join(row["problems"])
        print(f"{row['variant']:<32}{row['num_warps']:>6}{row['registers']:>6}"
              f"{row['local_bytes']:>9}  {loads}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
