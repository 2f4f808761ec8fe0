"""The results: medians and speedups per (method, tool), the table on stdout, the PNG chart."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Run
    from .tools import Tool


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
