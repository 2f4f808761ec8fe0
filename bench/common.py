"""What the standalone bench scripts share: timing a whole process, describing the machine, and
writing a result file under bench/results/."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path


def gnu_time(argv: list[str], log: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process, measured by GNU time (its own fork, so the
    peak is the tool's alone: a direct child of a big Python would inherit our RSS into it)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "LINES_FAST_TIME %e %M", *map(str, argv)],
                          capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    seconds, kb = proc.stderr.strip().splitlines()[-1].split()[1:]
    return float(seconds), int(kb) / 1e6


def machine() -> dict:
    import torch

    return {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_result(out_dir: str | Path, stem: str, result: dict) -> Path:
    """result as bench/results-style JSON: OUT_DIR/STEM-<yyyymmddThhmm>.json; prints and returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%dT%H%M')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path
