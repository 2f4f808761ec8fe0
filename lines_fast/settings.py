"""mergekit's per-tensor parameter settings: per-layer lists ("gradients") and filters.

A parameter's value in a config may be, as in mergekit 0.1.5:
    0.5                                  one value everywhere
    [0, 0.5, 1]                          a gradient: interpolated over the tensor's depth t
    {filter: self_attn, value: ...}      applies to tensors whose name contains the substring
    [{filter: mlp, value: [1, 0]}, {value: 0.5}]   the first entry that matches decides
A filter of None (absent) or "*" matches every tensor; a tensor no entry matches gets no
value from this setting, so the next one applies (a model's own parameters, then the
top-level ones, then the method's default).

Gradients: with n values v_0..v_{n-1} and t = l / (L - 1) for a tensor in block l of L
(0 outside every block: lines_fast.layers.depth_fractions), s = t (n - 1), i = floor(s),
the value is (1 - f) v_i + f v_{min(i + 1, n - 1)} with f = s - i, in double, exactly as
mergekit computes it. Only number parameters take gradients or filters.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import MergeInputError
from .methods import Param

FILTER_KEYS = {"filter", "value"}


def is_setting(value: Any, param: Param | None = None) -> bool:
    """A per-tensor setting (a list or a mapping), not one plain value; a mapping is the plain
    value of a mapping parameter (consensus: {k: 2})."""
    if param is not None and param.kind == "mapping" and isinstance(value, dict):
        return False
    return isinstance(value, (list, dict))


def check(param: Param, value: Any, where: str) -> None:
    """Validate a setting for `param`: its structure, and every value in it by the Param's rules.
    (Interpolation stays inside a number parameter's range: the ranges are intervals.)"""
    if not is_setting(value):
        param.check(value, where)
        return
    if param.kind != "number":
        raise MergeInputError(
            f"{where}: {param.name} is {param.range_text()}, so it takes one value, not a per-layer list or a "
            f"filtered setting ({value!r}); give one value.")
    if isinstance(value, dict):
        unknown = set(value) - FILTER_KEYS
        if unknown or "value" not in value:
            raise MergeInputError(
                f"{where}: {param.name}: a filtered setting is {{filter: SUBSTRING, value: ...}}; got {value!r}.")
        if value.get("filter") is not None and not isinstance(value["filter"], str):
            raise MergeInputError(f"{where}: {param.name}: filter must be a substring of tensor names, "
                                  f"got {value['filter']!r}.")
        if isinstance(value["value"], dict):
            raise MergeInputError(f"{where}: {param.name}: a filtered setting's value is a number or a list, "
                                  f"not another filter ({value['value']!r}).")
        check(param, value["value"], where)
        return
    if not value:
        raise MergeInputError(f"{where}: {param.name} is an empty list; give a value or a per-layer list.")
    if all(isinstance(v, dict) for v in value):
        for entry in value:
            check(param, entry, where)
        return
    if any(is_setting(v) for v in value):
        raise MergeInputError(f"{where}: {param.name} mixes numbers and filtered settings in one list "
                              f"({value!r}); give a list of numbers, or a list of {{filter, value}} entries.")
    for v in value:
        param.check(v, where)


def evaluate(value: Any, tensor_name: str | None, t: float) -> Any:
    """The setting's value for tensor `tensor_name` at depth t, or None where no filter matches.
    tensor_name None (validating a config before its tensors are known): the first entry."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for entry in value:
            pattern = entry.get("filter")
            if (tensor_name is None or pattern is None or pattern == "*"
                    or (tensor_name and pattern in tensor_name)):
                return evaluate(entry["value"], tensor_name, t)
        return None
    scaled = t * (len(value) - 1)   # mergekit: int(scaled), i.e. floor for t >= 0
    low = int(math.floor(scaled))
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * float(value[low]) + frac * float(value[high])


def filters(value: Any) -> list[str]:
    """The filter substrings of a setting (for the check that each matches some tensor)."""
    entries = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    return [e["filter"] for e in entries if isinstance(e, dict) and e.get("filter") not in (None, "*")]
