"""A progress bar on stderr for long passes: tensors, GB read, GB/s and ETA, only on a terminal."""
from __future__ import annotations

import sys

_open_bars = 0   # Progress bars on the terminal now: say() must print above them


def say(message: str) -> None:
    """Prints a line to stderr, above the progress bar if one is drawn (not glued to it)."""
    if _open_bars:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, label: str, total_bytes: int, enabled: bool | None = None, tensors: int = 0):
        self._tensors_total = tensors
        self._tensors_done = 0
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled and total_bytes > 0:
            global _open_bars
            from tqdm import tqdm

            _open_bars += 1
            self._bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True,
                             unit_divisor=1000, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, nbytes: int, tensors: int = 1) -> None:
        """`tensors` more tensors done, nbytes of input read for them."""
        self._tensors_done += tensors
        if self._bar is not None:
            if self._tensors_total:
                self._bar.set_postfix_str(f"tensors {self._tensors_done}/{self._tensors_total}", refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            global _open_bars
            self._bar.close()
            self._bar = None
            _open_bars -= 1
