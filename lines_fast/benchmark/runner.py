"""Running the benchmark: one timed child process per (method, tool, repeat), the page cache
warmed first, and the whole `lines-fast bench` command around them."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..engine import SUMMARY_TIMES
from ..errors import MergeInputError
from .machine import _machine_tag, machine_info, source_fingerprint, versions
from .report import format_table, plot, summarize
from .tools import (_LAUNCHER, _MERGEKIT_INSTALL, _REPORT_ENV, MERGEKIT_ENV, MERGEKIT_FLAGS, Tool, _mergekit_version,
                    find_mergekit, make_tools, reference_tool)
from .workload import DENSITY, bench_methods, prepare_workload, verify, write_configs

DEVICES = ("cpu", "cuda", "interpret")
COMPARE = ("reference", "mergekit")


@dataclass
class Run:
    method: str
    tool: str
    repeat: int
    position: int              # order within the repeat (0 = first)
    argv: list[str]
    returncode: int
    seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    peak_rss_bytes: int
    gpu_peak_allocated: int | None = None
    gpu_peak_reserved: int | None = None
    engine_seconds: float | None = None     # lines_fast's own timing (from its summary line)
    engine_passes: dict[str, float] = field(default_factory=dict)
    loadavg_1m: float | None = None         # the machine's load just before: flags noisy runs
    error: str | None = None


_PASS = re.compile(r"pass \d+/\d+ \((\w+)\) took ([0-9.]+) s")


def run_child(argv: list[str], log_stem: Path) -> dict:
    """Run argv to completion; wall seconds, rusage of exactly this child (through _LAUNCHER), and
    its GPU report."""
    report = log_stem.with_suffix(".gpu.json")
    report.unlink(missing_ok=True)
    usage_file = log_stem.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    env = dict(os.environ, **{_REPORT_ENV: str(report)})
    with open(log_stem.with_suffix(".out"), "wb") as out, open(log_stem.with_suffix(".err"), "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(usage_file), *argv], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
        proc.wait()
        seconds = time.perf_counter() - start
    measured = json.loads(usage_file.read_text()) if usage_file.exists() else {"maxrss_kb": 0, "utime": 0.0,
                                                                                "stime": 0.0}

    gpu = json.loads(report.read_text()) if report.exists() else {}
    stdout = log_stem.with_suffix(".out").read_text(errors="replace")
    stderr = log_stem.with_suffix(".err").read_text(errors="replace")
    return {
        "returncode": proc.returncode, "seconds": seconds,
        "cpu_user_seconds": measured["utime"], "cpu_system_seconds": measured["stime"],
        "peak_rss_bytes": measured["maxrss_kb"] * 1024,  # Linux reports kilobytes
        "gpu_peak_allocated": gpu.get("gpu_peak_allocated"), "gpu_peak_reserved": gpu.get("gpu_peak_reserved"),
        "stdout": stdout, "stderr": stderr,
    }


def _timed_run(tool: Tool, method: str, config: Path, out: Path, logs: Path, repeat: int, position: int) -> Run:
    if out.exists():
        shutil.rmtree(out)
    os.sync()  # the previous run's dirty pages are written back now, not during this run
    argv = tool.argv(config, out)
    load = os.getloadavg()[0]
    child = run_child(argv, logs / f"{method}-{tool.label.replace('/', '-')}-r{repeat}")
    run = Run(method=method, tool=tool.label, repeat=repeat, position=position, argv=argv,
              returncode=child["returncode"], seconds=child["seconds"],
              cpu_user_seconds=child["cpu_user_seconds"], cpu_system_seconds=child["cpu_system_seconds"],
              peak_rss_bytes=child["peak_rss_bytes"], gpu_peak_allocated=child["gpu_peak_allocated"],
              gpu_peak_reserved=child["gpu_peak_reserved"], loadavg_1m=load)
    if tool.kind == "lines_fast":
        found = SUMMARY_TIMES.search(child["stdout"])
        run.engine_seconds = float(found.group(1)) if found else None
        run.engine_passes = {name: float(s) for name, s in _PASS.findall(child["stderr"])}
    if run.returncode != 0:
        run.error = (child["stderr"].strip() or child["stdout"].strip())[-2000:]
    return run


def warm_page_cache(files: list[Path], block: int = 16 << 20) -> tuple[int, float]:
    """Read every file once so that every tool then reads from memory (no root needed)."""
    start = time.perf_counter()
    total = 0
    buf = bytearray(block)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - start


def _split(text: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise MergeInputError(f"--{what}: {', '.join(bad)} not one of {', '.join(allowed)}.")
    return list(dict.fromkeys(items))


def run_benchmark(workload: str = "llama-336m", methods: str = "ties,task_arithmetic", devices: str = "cpu",
                  compare: str = "", repeats: int = 1, workdir: str | None = None, out: str = "bench/results",
                  mergekit: str | None = None, command: str | None = None) -> tuple[dict, Path]:
    """The whole benchmark; returns the result dict and the JSON path (bench_command prints)."""
    method_list = _split(methods, bench_methods(), "methods")
    device_list = _split(devices, DEVICES, "devices")
    compare_list = _split(compare, COMPARE, "compare")
    if not method_list or not device_list:
        raise MergeInputError("--methods and --devices must each name at least one.")
    if repeats < 1:
        raise MergeInputError(f"--repeats must be at least 1, got {repeats}.")
    if "cuda" in device_list:
        import torch
        if not torch.cuda.is_available():
            raise MergeInputError("--devices cuda: no CUDA GPU is visible here; use --devices cpu.")
    mergekit_path = None
    if "mergekit" in compare_list:
        mergekit_path = find_mergekit(mergekit)
        if mergekit_path is None:   # asked for by name: a table without it would answer another question
            raise MergeInputError(_MERGEKIT_INSTALL.format(env=MERGEKIT_ENV).rstrip())

    temp = None
    if workdir is None:
        temp = tempfile.mkdtemp(prefix="lines-fast-bench-")
        workdir = temp
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(work, workload, method_list, device_list, compare_list, repeats, Path(out), mergekit_path,
                    command)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        else:  # keep the inputs for the next run; the outputs are large and reproducible
            shutil.rmtree(work / "outputs", ignore_errors=True)


def _run(work: Path, workload_name: str, methods: list[str], devices: list[str], compare: list[str],
         repeats: int, out_dir: Path, mergekit_path: Path | None, command: str | None) -> tuple[dict, Path]:
    workload = prepare_workload(workload_name, work)
    configs = write_configs(workload, methods, work / "configs")
    tools = make_tools(devices, compare, mergekit_path)
    mk_tools = [t for t in tools if t.kind == "mergekit"]
    mk_version = _mergekit_version(mk_tools[0]) if mk_tools else None
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    outputs = work / "outputs"

    def out_path(method: str, tool: Tool) -> Path:
        return outputs / method / tool.label.replace("/", "-")

    source_before = source_fingerprint()
    load_before = os.getloadavg()  # other work on the machine shows here; alternation spreads it
    nbytes, warm_s = warm_page_cache(workload.files)
    print(f"workload {workload.recipe}: {workload.params_per_model / 1e6:.3g} M parameters per model, "
          f"{workload.input_bytes / 1e9:.3g} GB of input tensors ({'reused' if workload.reused else 'generated'}); "
          f"read once untimed ({nbytes / 1e9:.3g} GB in {warm_s:.2g} s) so every tool reads from the page cache",
          flush=True)

    # The fixed cost of one process (interpreter + imports), once per tool kind; it also loads
    # the libraries' files into the page cache before the first timed run.
    # Run twice and keep the second: the first is mostly reading the libraries from disk.
    startup = {}
    for tool in tools:
        if tool.kind not in startup:
            for _ in range(2):
                child = run_child(tool.startup_argv(), logs / f"startup-{tool.kind}")
            startup[tool.kind] = child["seconds"] if child["returncode"] == 0 else None

    # Verification needs the reference's output; if it is not a timed column, make it once, untimed.
    verify_ref = None
    if "reference" not in compare:
        verify_ref = reference_tool()
        for method in methods:
            print(f"  {method}: reference merge for verification (untimed) ...", flush=True)
            run = _timed_run(verify_ref, method, configs[method], out_path(method, verify_ref), logs, 0, 0)
            if run.returncode != 0:
                raise RuntimeError(f"the reference merge failed ({method}):\n{run.error}")

    runs: list[Run] = []
    for repeat in range(repeats):
        # Rotate the starting tool each repeat, so no tool always runs right after a given other one.
        order = tools[repeat % len(tools):] + tools[:repeat % len(tools)]
        for method in methods:
            for position, tool in enumerate(order):
                run = _timed_run(tool, method, configs[method], out_path(method, tool), logs, repeat, position)
                runs.append(run)
                status = f"{run.seconds:7.2f} s, peak RSS {run.peak_rss_bytes / 1e9:5.2f} GB" if run.returncode == 0 \
                    else f"FAILED (exit {run.returncode}): {run.error.splitlines()[-1] if run.error else ''}"
                print(f"  repeat {repeat + 1}/{repeats}  {method:<16} {tool.label:<18} {status}", flush=True)

    # Verify the last output of each (method, tool) against the reference's.
    verification: dict[str, dict] = {}
    for method in methods:
        ref_out = out_path(method, verify_ref or next(t for t in tools if t.kind == "reference"))
        for tool in tools:
            if tool.kind == "reference" or not (out_path(method, tool)).exists():
                continue
            if not any(r.method == method and r.tool == tool.label and r.returncode == 0 for r in runs):
                continue
            v = verify(out_path(method, tool), ref_out)
            # mergekit implements its own semantics (README: differences), so it is compared for
            # information; lines_fast must agree with the reference.
            v["informational"] = tool.kind == "mergekit"
            verification[f"{method}|{tool.label}"] = v

    rows = summarize(runs, tools, methods, workload.input_bytes)
    source_after = source_fingerprint()
    machine = machine_info()
    machine["loadavg_1_5_15_before"] = list(load_before)
    machine["loadavg_1_5_15_after"] = list(os.getloadavg())
    now = datetime.now(timezone.utc)
    show_gpu = "cuda" in devices
    table = format_table(rows, verification, show_gpu)
    result = {
        "schema": 1,
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(mk_version),
        "source": {**source_before, "changed_during_runs": source_after != source_before},
        "workload": workload.to_json(),
        "settings": {
            "methods": methods, "devices": devices, "compare": compare, "repeats": repeats,
            "tools": [t.label for t in tools], "density": DENSITY, "lambda": 1.0,
            "compute_dtype": "float32", "out_dtype": "bfloat16",
            "mergekit_flags": list(MERGEKIT_FLAGS) if mk_tools else None,
            "configs": {m: Path(p).read_text() for m, p in configs.items()},
            "notes": [
                "each run is a separate process; seconds are wall time from spawn to exit, so they include "
                "interpreter start and imports (startup_seconds gives that fixed cost per tool)",
                "inputs were read once, untimed, before timing: every tool reads from the page cache "
                "(dropping the cache needs root)",
                "before each run its output directory is deleted and os.sync() flushes dirty pages, untimed",
                "tools alternate within each repeat, starting one tool later each repeat",
                "peak RSS is the tool's own ru_maxrss (os.wait4 in a small launcher process, so the benchmark's own "
                "memory is not inherited into it); it counts file pages the tool maps, and "
                "lines_fast and mergekit memory-map their inputs",
                "lines_fast fsyncs its output shards before publishing them; mergekit and the reference do not",
                "input GB/s = bytes of all input tensors (base + fine-tunes) / median seconds",
                "mergekit's output is compared with the reference for information only",
            ],
        },
        "startup_seconds": startup,
        "runs": [asdict(r) for r in runs],
        "results": rows,
        "verification": verification,
        "table": table,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{workload.recipe}-{_machine_tag(machine, devices)}-{now.strftime('%Y%m%dT%H%M')}"
    json_path = out_dir / f"{stem}.json"
    png = out_dir / f"{stem}.png"
    result["png"] = png.name if plot(result, png) else None
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result, json_path


def _command_line(args) -> str:
    parts = ["lines-fast", "bench", "--workload", args.workload, "--methods", args.methods,
             "--devices", args.devices]
    if args.compare:
        parts += ["--compare", args.compare]
    parts += ["--repeats", str(args.repeats)]
    if args.workdir:
        parts += ["--workdir", str(args.workdir)]
    if args.out != "bench/results":
        parts += ["--out", str(args.out)]
    return " ".join(parts)


def bench_command(args) -> int:
    """`lines-fast bench`: 0 when every run succeeded and every lines_fast output verified."""
    result, json_path = run_benchmark(
        workload=args.workload, methods=args.methods, devices=args.devices, compare=args.compare,
        repeats=args.repeats, workdir=args.workdir, out=args.out, mergekit=getattr(args, "mergekit", None),
        command=_command_line(args))
    print()
    print(f"{result['workload']['recipe']}: {result['workload']['input_bytes'] / 1e9:.3g} GB of input tensors; "
          f"median of {args.repeats} run(s) per row, each a separate process, inputs in the page cache")
    print(result["table"])
    startup = ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_seconds"].items() if v is not None)
    print(f"process start + imports (included above): {startup}")
    bad = [f"{k.replace('|', ' ')}: {'; '.join(v['failures'][:3] + v['missing'][:3])}"
           for k, v in result["verification"].items() if not v["ok"] and not v["informational"]]
    lf_verified = [k for k, v in result["verification"].items() if not v["informational"]]
    if lf_verified and not bad:
        print("every lines_fast output matches the reference within docs/methods.md's tolerances")
    for line in bad:
        print(f"VERIFICATION FAILED: {line}", file=sys.stderr)
    if result["source"]["changed_during_runs"]:
        print("WARNING: lines_fast's source files changed while the benchmark ran; the runs mix code "
              "versions. Rerun on a quiet tree before quoting these numbers.", file=sys.stderr)
    print(f"wrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if result["png"] else
                                  " (no chart: pip install matplotlib, then "
                                  f"`python -m lines_fast.benchmark plot {json_path}`)"))
    failed = [r for r in result["runs"] if r["returncode"] != 0 and not r["tool"].startswith("mergekit")]
    return 1 if bad or failed else 0
