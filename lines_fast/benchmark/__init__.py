"""`lines-fast bench`: end-to-end merge benchmarks, the source of every figure the README quotes.

    lines-fast bench --workload llama-336m --methods ties,task_arithmetic \\
        --compare reference,mergekit --repeats 3

What it does, and why each step is there:

1. Workload. A synthetic Llama-shaped family (lines_fast.synth: a bf16 base and 3 fine-tunes)
   is generated once into --workdir (reused when a previous run left the same recipe there)
   or into a temporary directory. One mergekit-format YAML per method (ties density 0.2,
   task_arithmetic; lambda 1, compute dtype float32, out_dtype bfloat16): mergekit and
   lines_fast read the very same file, so both do the same merge.
2. Page cache. Dropping the page cache needs root, so instead every input file is read once,
   untimed, before anything is timed: every tool then reads its inputs from memory, and the
   numbers measure the tools, not the disk. Before each run the previous output is deleted
   and os.sync() flushes dirty pages, so one run's writeback never lands in the next's time.
3. Runs. Every (method, tool) runs end to end as its own process -- interpreter start,
   imports, reading, merging, writing -- because that is what a user waits for. Wall seconds
   are spawn-to-exit; peak RSS is the tool's own ru_maxrss (os.wait4 in a small launcher: a direct
   child would inherit this process's RSS into its ru_maxrss); on cuda the child
   reports torch's peak GPU memory from an atexit hook. Tools alternate within each repeat
   (lines_fast, mergekit, reference, lines_fast, ...), starting one tool later each repeat,
   so a machine that drifts (thermal, noisy neighbours) favours none of them.
4. Verification. Every lines_fast output is compared tensor by tensor with the reference's
   output under docs/methods.md's tolerances (lines_fast.tolerance.compare); mergekit's output is
   compared too, for information only (its TIES breaks ties and zero signs differently).
5. Report. A table on stdout, JSON (machine, versions, workload, every run's raw numbers,
   medians) and, when matplotlib is importable, a PNG bar chart, all under --out.

The "reference" tool is `python -m lines_fast.benchmark reference CONFIG OUT`: a plain script
that loads whole state dicts with safetensors, calls lines_fast.reference.merge_with_spec
and saves the result with safetensors -- what a user without lines_fast would write.

The harness, one concern a module:

    tools.py      the timed tools (one Tool per column), finding mergekit, the child launcher
    runner.py     the timed runs, page-cache warming, run_benchmark and `lines-fast bench`
    workload.py   the synthetic family, the per-method configs, verification
    machine.py    machine, versions and source fingerprint of a result
    report.py     medians and speedups, the table, the chart
    reference.py  the reference tool's merge (run through __main__.py)
"""
from __future__ import annotations

from .machine import machine_info, source_fingerprint, versions
from .reference import reference_main
from .report import format_table, plot, summarize
from .runner import COMPARE, DEVICES, Run, bench_command, run_benchmark, run_child, warm_page_cache
from .tools import MERGEKIT_ENV, MERGEKIT_FLAGS, Tool, find_mergekit, make_tools, reference_tool
from .workload import (DENSITY, N_FINETUNES, WORKLOAD_DTYPE, WORKLOAD_SEED, Workload, bench_methods,
                       prepare_workload, verify, write_configs)

__all__ = [
    "COMPARE", "DENSITY", "DEVICES", "MERGEKIT_ENV", "MERGEKIT_FLAGS", "N_FINETUNES", "WORKLOAD_DTYPE",
    "WORKLOAD_SEED", "Run", "Tool", "Workload", "bench_command", "bench_methods", "find_mergekit", "format_table",
    "machine_info", "make_tools", "plot", "prepare_workload", "reference_main", "reference_tool", "run_benchmark",
    "run_child", "source_fingerprint", "summarize", "verify", "versions", "warm_page_cache", "write_configs",
]
