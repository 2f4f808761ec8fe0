"""torch, imported on first use, for the modules the front end imports.

`import torch` takes 1.5-2 s: most of a small merge's run, and all of `lines-fast plan`'s. The
front end (config, safetensors headers, layer tables, planning, every check of the inputs and the
output directory) does not need it; the data path does. Those modules write
`from .lazy import torch` and use torch as usual: the first attribute read imports it, so a
merge refused for its inputs, `plan` and `layers` never load it (tests/test_startup.py).
"""
import time


class _Torch:
    def __getattr__(self, name: str):
        import torch
        value = getattr(torch, name)
        setattr(self, name, value)   # read once: later reads are a plain attribute lookup
        return value

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch = _Torch()


def load() -> float:
    """Imports torch now, where the data path starts; the seconds it took (about 0 if it was loaded)."""
    started = time.perf_counter()
    import torch   # noqa: F401
    return time.perf_counter() - started
