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
that loads whole state dicts with safetensors, calls lines_fast.reference.merge_state_dicts
and saves the result with safetensors -- what a user without lines_fast would write.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import MergeInputError

DENSITY = 0.2
N_FINETUNES = 3
WORKLOAD_DTYPE = "bfloat16"
WORKLOAD_SEED = 0
DEVICES = ("cpu", "cuda", "interpret")
COMPARE = ("reference", "mergekit")


def bench_methods() -> tuple[str, ...]:
    """The registered methods that merge the workload's three fine-tunes (not wise_ft's one)."""
    from . import methods

    return tuple(m.name for m in methods.REGISTRY.values()
                 if m.min_models <= N_FINETUNES and (m.max_models is None or m.max_models >= N_FINETUNES))


MERGEKIT_ENV = "LINES_FAST_MERGEKIT"
# mergekit's --out-shard-size counts bytes (tensor numel * element_size) despite its help text
# saying parameters, so 5B is exactly lines_fast's default --max-shard-size 5GB: equal sharding.
MERGEKIT_FLAGS = ("--out-shard-size", "5B")
_REPORT_ENV = "LINES_FAST_BENCH_REPORT"
_MERGEKIT_INSTALL = """\
mergekit-yaml was not found (looked at --mergekit, ${env}, and PATH), so its column is skipped.
To compare, install it in a virtualenv of its own, so it never becomes a dependency of this
environment; --system-site-packages reuses this torch, and the constraint stops pip from
pulling another (e.g. a CUDA) build:
  python3 -m venv /tmp/mk-venv --system-site-packages
  python3 -c 'import torch; print("torch==" + torch.__version__)' > /tmp/mk-constraints.txt
  /tmp/mk-venv/bin/pip install -c /tmp/mk-constraints.txt mergekit==0.1.5
  export {env}=/tmp/mk-venv/bin/mergekit-yaml"""

# Runs a tool (a module or a script path) inside a process that, on exit, writes torch's peak
# GPU memory to $LINES_FAST_BENCH_REPORT. The hook adds nothing to the run itself, and it needs
# nothing but the standard library, so it also wraps mergekit under its own virtualenv's python.
_CHILD_WRAPPER = r"""
import atexit, json, os, runpy, sys
def _report():
    report = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        report = {"gpu_peak_allocated": torch.cuda.max_memory_allocated(),
                  "gpu_peak_reserved": torch.cuda.max_memory_reserved()}
    with open(os.environ["LINES_FAST_BENCH_REPORT"], "w") as f:
        json.dump(report, f)
atexit.register(_report)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


# --------------------------------------------------------------------------- tools

@dataclass
class Tool:
    """One column of the table: how to run a merge of CONFIG into OUT as a child process."""

    label: str                 # "lines_fast/cpu", "mergekit/cpu", "reference"
    kind: str                  # "lines_fast", "mergekit", "reference"
    device: str
    python: str | None         # interpreter that runs the wrapper (None: run `script` bare)
    target_kind: str           # "module" or "path" (for the wrapper)
    target: str
    extra: tuple[str, ...] = ()

    def argv(self, config: Path, out: Path) -> list[str]:
        if self.kind == "lines_fast":
            args = ["merge", str(config), str(out), "--device", self.device, "--no-progress", "--force"]
        elif self.kind == "mergekit":
            args = [str(config), str(out), *self.extra]
        else:
            args = ["reference", str(config), str(out)]
        if self.python is None:  # a script we cannot wrap (e.g. a shell shim): no GPU report
            return [self.target, *args]
        return [self.python, "-c", _CHILD_WRAPPER, self.target_kind, self.target, *args]

    def startup_argv(self) -> list[str]:
        """A no-op invocation that imports what a run imports: the fixed cost of one process."""
        if self.kind == "mergekit":
            return ([self.python, self.target] if self.python else [self.target]) + ["--help"]
        module = "lines_fast.engine" if self.kind == "lines_fast" else "lines_fast.reference"
        return [self.python, "-c", f"import {module}, safetensors.torch"]


def _script_python(script: Path) -> str | None:
    """The python interpreter named by a console script's shebang, if it is a plain one."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    interpreter = first[2:].strip().split()[0] if first[2:].strip() else ""
    return interpreter if Path(interpreter).name.startswith("python") and Path(interpreter).exists() else None


def find_mergekit(option: str | None = None) -> Path | None:
    """mergekit-yaml from --mergekit, $LINES_FAST_MERGEKIT, or PATH (first found)."""
    for candidate in (option, os.environ.get(MERGEKIT_ENV), shutil.which("mergekit-yaml")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate).resolve()
    return None


def _mergekit_version(tool: Tool) -> str | None:
    python = tool.python or sys.executable
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_tools(devices: list[str], compare: list[str], mergekit: Path | None) -> list[Tool]:
    """The timed tools in alternation order: per device lines_fast then mergekit; reference last."""
    tools = []
    for device in devices:
        tools.append(Tool(f"lines_fast/{device}", "lines_fast", device, sys.executable, "module",
                          "lines_fast.cli"))
        # mergekit has a CPU and a CUDA path; the Triton interpreter is ours alone.
        if mergekit is not None and "mergekit" in compare and device in ("cpu", "cuda"):
            extra = MERGEKIT_FLAGS + (("--cuda",) if device == "cuda" else ())
            tools.append(Tool(f"mergekit/{device}", "mergekit", device, _script_python(mergekit), "path",
                              str(mergekit), extra))
    if "reference" in compare:
        tools.append(reference_tool())
    return tools


def reference_tool() -> Tool:
    return Tool("reference", "reference", "cpu", sys.executable, "module", "lines_fast.benchmark")


# --------------------------------------------------------------------------- running

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


_SUMMARY = re.compile(r" in ([0-9.]+) s: read ")
_PASS = re.compile(r"pass \d+/\d+ \((\w+)\) took ([0-9.]+) s")


# Linux carries a process's ru_maxrss over from its parent across fork and exec (the forked
# copy of the parent's memory counts), so a child of this big process would report at least our
# own RSS. A small launcher forks the tool instead and reports the tool's own rusage.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kb": ru.ru_maxrss, "utime": ru.ru_utime, "stime": ru.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


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
        found = _SUMMARY.search(child["stdout"])
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


# --------------------------------------------------------------------------- the reference tool

def _load_state_dict(model_dir: Path) -> dict:
    """All tensors of an HF directory (sharded or not), read into memory with safetensors."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif model_dir.is_file():
        return load_file(model_dir)
    else:
        shards = ["model.safetensors"] if (model_dir / "model.safetensors").is_file() else \
            sorted(p.name for p in model_dir.glob("*.safetensors"))
    state: dict = {}
    for shard in shards:
        state.update(load_file(model_dir / shard))
    return state


def reference_main(config_path: str, out_dir: str) -> int:
    """The "reference" tool: whole state dicts through lines_fast.reference, saved with safetensors."""
    from safetensors.torch import save_file

    from .config import load_yaml
    from .reference import merge_with_spec

    config = load_yaml(Path(config_path))
    base = _load_state_dict(config.base) if config.base is not None else None
    models = [_load_state_dict(p) for p in config.merge_inputs]
    merged = merge_with_spec(base, models, config.method_spec(), exclude=config.exclude,
                             out_dtype=config.out_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return 0


# --------------------------------------------------------------------------- workload

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
    from .checkpoint import Checkpoint
    from .synth import FamilyPaths, checkpoint_bytes, param_count, recipe, write_checkpoint_family

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
    from . import methods as registry
    from .synth import FamilyPaths, write_yaml_config

    family = FamilyPaths(workload.base, workload.finetunes)

    def normalize(method: str):
        param = registry.get(method).param("normalize")
        return None if param is None else param.default

    return {m: write_yaml_config(where / f"{m}.yaml", family, method=m, density=DENSITY, lam=1.0,
                                 normalize=normalize(m), dtype="float32", out_dtype="bfloat16")
            for m in methods}


# --------------------------------------------------------------------------- verification

def verify(candidate: Path, reference: Path) -> dict:
    """Every tensor of `reference` against `candidate` under docs/methods.md's tolerances.

    Both are opened as memory maps and compared tensor by tensor, so this needs a few times
    the largest tensor in memory, not the model."""
    from .checkpoint import Checkpoint
    from .tolerance import compare

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


# --------------------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = None
    gpu = None
    if shutil.which("nvidia-smi"):  # asking torch would start a CUDA context in this process
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            gpu = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {"platform": platform.platform(), "hostname": socket.gethostname(),
            "cpu_model": cpu_model or platform.processor() or None,
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "ram_bytes": ram, "gpu": gpu}


def versions(mergekit_version: str | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "torch": v("torch"), "triton": v("triton"),
           "safetensors": v("safetensors"), "lines_fast": __version__}
    if mergekit_version:
        out["mergekit"] = mergekit_version
    return out


def source_fingerprint() -> dict:
    """A hash of lines_fast's own source files, and the git commit when there is one.

    Taken before and after the runs: if the code under test changed meanwhile (an edit in the
    working tree), the numbers mix versions and the report says so."""
    import hashlib

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    commit = None
    try:  # read-only: rev-parse never touches the index or the work tree
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"sha256": digest.hexdigest(), "git_commit": commit}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _machine_tag(machine: dict, devices: list[str]) -> str:
    """The hostname in a container is random; the CPU (or GPU) says which machine it was."""
    if "cuda" in devices and machine.get("gpu"):
        return _slug(machine["gpu"].split(",")[0])
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", (machine.get("cpu_model") or "cpu").lower(),
                 flags=re.I)
    return f"{_slug(cpu) or _slug(machine['hostname'])}-{machine['cpus_usable']}c"


# --------------------------------------------------------------------------- summary

def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[Run], tools: list[Tool], methods: list[str], input_bytes: int) -> list[dict]:
    """One row per (method, tool): medians over the successful repeats, and the speedups."""
    rows = []
    for method in methods:
        by_tool = {}
        for tool in tools:
            ok = [r for r in runs if r.method == method and r.tool == tool.label and r.returncode == 0]
            failed = [r for r in runs if r.method == method and r.tool == tool.label and r.returncode != 0]
            seconds = _median([r.seconds for r in ok])
            gpu = [r.gpu_peak_reserved for r in ok if r.gpu_peak_reserved is not None]
            by_tool[tool.label] = {
                "method": method, "tool": tool.label, "device": tool.device, "runs": len(ok), "failed": len(failed),
                "median_seconds": seconds,
                "min_seconds": min((r.seconds for r in ok), default=None),
                "max_seconds": max((r.seconds for r in ok), default=None),
                "median_engine_seconds": _median([r.engine_seconds for r in ok if r.engine_seconds is not None]),
                "median_cpu_seconds": _median([r.cpu_user_seconds + r.cpu_system_seconds for r in ok]),
                "input_gbps": input_bytes / seconds / 1e9 if seconds else None,
                # Peaks: the largest over the repeats (they barely vary; the largest is what one must provision).
                "peak_rss_bytes": max((r.peak_rss_bytes for r in ok), default=None),
                "peak_gpu_bytes": max(gpu) if gpu else None,
            }
        for label, row in by_tool.items():
            ref = by_tool.get("reference", {}).get("median_seconds")
            # Against mergekit on the same device when it ran there, else mergekit on the CPU.
            mk = (by_tool.get(f"mergekit/{row['device']}") or by_tool.get("mergekit/cpu") or {}).get("median_seconds")
            s = row["median_seconds"]
            row["speedup_vs_reference"] = ref / s if ref and s else None
            row["speedup_vs_mergekit"] = mk / s if mk and s else None
            rows.append(row)
    return rows


def format_table(rows: list[dict], verification: dict[str, dict], show_gpu: bool) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = ["method", "tool/backend", "seconds", "input GB/s", "peak RSS GB"]
    head += ["peak GPU GB"] if show_gpu else []
    head += ["vs reference", "vs mergekit", "max |diff| vs ref"]
    lines = []
    for row in rows:
        v = verification.get(f"{row['method']}|{row['tool']}")
        if v is None:
            check = "-"
        elif v.get("informational"):
            check = f"{v['max_abs_diff']:.3g}*"
        else:
            check = f"{v['max_abs_diff']:.3g}" + ("" if v["ok"] else " FAILED")
        seconds = num(row["median_seconds"], ".2f") if row["runs"] else "failed"
        cells = [row["method"], row["tool"], seconds, num(row["input_gbps"], ".3g"),
                 num(row["peak_rss_bytes"] and row["peak_rss_bytes"] / 1e9, ".2f")]
        cells += [num(row["peak_gpu_bytes"] and row["peak_gpu_bytes"] / 1e9, ".2f")] if show_gpu else []
        cells += [num(row["speedup_vs_reference"], ".2f") + ("x" if row["speedup_vs_reference"] else ""),
                  num(row["speedup_vs_mergekit"], ".2f") + ("x" if row["speedup_vs_mergekit"] else ""), check]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    text = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    notes = [f"{k.replace('|', ' ')}: {v['elements_different']:,} of {v['elements']:,} elements differ"
             for k, v in verification.items() if v.get("informational") and v["elements_different"]]
    if notes:
        text.append("* mergekit vs the reference, for information (README: differences from mergekit): "
                    + "; ".join(notes))
    return "\n".join(text)


def plot(result: dict, png: Path) -> bool:
    """Bar chart of input GB/s by method and tool/backend; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["results"] if r["input_gbps"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    width = 0.8 / max(len(tools), 1)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(methods) * max(len(tools), 1) / 2, 4.2))
    for j, tool in enumerate(tools):
        xs, ys, secs = [], [], []
        for i, method in enumerate(methods):
            row = next((r for r in rows if r["method"] == method and r["tool"] == tool), None)
            if row:
                xs.append(i + (j - (len(tools) - 1) / 2) * width)
                ys.append(row["input_gbps"])
                secs.append(row["median_seconds"])
        bars = ax.bar(xs, ys, width * 0.95, label=tool)
        for bar, s in zip(bars, secs):
            ax.annotate(f"{s:.1f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("input GB/s (end to end, higher is better)")
    w, m = result["workload"], result["machine"]
    ax.set_title(f"{w['recipe']} {w['dtype']}, base + {w['n_finetunes']} fine-tunes "
                 f"({w['input_bytes'] / 1e9:.3g} GB read)\n{m.get('gpu') or m.get('cpu_model')}, "
                 f"{m['cpus_usable']} cores; median of {result['settings']['repeats']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the command

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
        if mergekit_path is None:
            print(_MERGEKIT_INSTALL.format(env=MERGEKIT_ENV), file=sys.stderr)

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


def _main(argv: list[str]) -> int:
    """Entry points of the child processes (and re-plotting), not a user interface."""
    usage = ("usage: python -m lines_fast.benchmark reference CONFIG OUT_DIR\n"
             "       python -m lines_fast.benchmark plot RESULT.json [OUT.png]")
    if len(argv) == 3 and argv[0] == "reference":
        return reference_main(argv[1], argv[2])
    if len(argv) in (2, 3) and argv[0] == "plot":
        path = Path(argv[1])
        png = Path(argv[2]) if len(argv) == 3 else path.with_suffix(".png")
        result = json.loads(path.read_text())
        if not plot(result, png):
            print("matplotlib is not importable here: pip install matplotlib", file=sys.stderr)
            return 1
        if png.parent.resolve() == path.parent.resolve():  # record the chart next to its data
            result["png"] = png.name
            path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {png}")
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
