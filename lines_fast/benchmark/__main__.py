"""`python -m lines_fast.benchmark`: the reference tool's child process, and re-plotting."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .reference import reference_main
from .report import plot


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
