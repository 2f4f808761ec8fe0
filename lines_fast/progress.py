"""A progress bar on stderr for long passes: GB read, GB/s and ETA, only on a terminal."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, label: str, total_bytes: int, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled and total_bytes > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True,
                             unit_divisor=1000, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
