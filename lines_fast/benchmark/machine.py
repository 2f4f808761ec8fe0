"""What the results are tied to: the machine, the library versions, the source under test."""
from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from pathlib import Path


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

    from .. import __version__

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

    package = Path(__file__).resolve().parent.parent  # lines_fast/, not this benchmark/ package
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
