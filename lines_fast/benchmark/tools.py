"""The tools the benchmark times, and the small programs each timed process runs inside:
one Tool per column of the table, how to find mergekit, and the launcher that reports a
tool's own rusage."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MERGEKIT_ENV = "LINES_FAST_MERGEKIT"
# mergekit's --out-shard-size counts bytes (tensor numel * element_size) despite its help text
# saying parameters, so 5B is exactly lines_fast's default --max-shard-size 5GB: equal sharding.
MERGEKIT_FLAGS = ("--out-shard-size", "5B")
_REPORT_ENV = "LINES_FAST_BENCH_REPORT"
_MERGEKIT_INSTALL = """\
--compare mergekit: mergekit-yaml was not found (looked at --mergekit, ${env}, and PATH).
Drop mergekit from --compare, or install it in a virtualenv of its own, so it never becomes a dependency of this
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
