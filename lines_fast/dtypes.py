"""The element types of checkpoints, without torch.

`import torch` takes 1.5-2 s, most of a small merge's run and all of `lines-fast plan`'s, so the
front end (config, safetensors headers, layer tables, planning, every input check) names dtypes
with this table and only the data path asks for the torch dtype (`DType.torch`), when it reads
or makes a tensor. The attribute names are torch's (`itemsize`, `is_floating_point`), so code
that reads them works on either.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import MergeInputError


@dataclass(frozen=True, eq=False)   # one object per dtype (BY_CODE): compared by identity, as fast as torch's
class DType:
    code: str                 # safetensors' name: "BF16"
    name: str                 # torch's: "bfloat16" (torch.bfloat16)
    itemsize: int
    is_floating_point: bool

    @property
    def torch(self):
        """The torch dtype (importing torch)."""
        return _torch_dtype(self.name, self.code)

    def __str__(self) -> str:
        return self.name


# safetensors' dtypes that lines_fast reads, by their header name.
BY_CODE: dict[str, DType] = {d.code: d for d in (
    DType("F64", "float64", 8, True),
    DType("F32", "float32", 4, True),
    DType("F16", "float16", 2, True),
    DType("BF16", "bfloat16", 2, True),
    DType("I64", "int64", 8, False),
    DType("I32", "int32", 4, False),
    DType("I16", "int16", 2, False),
    DType("I8", "int8", 1, False),
    DType("U8", "uint8", 1, False),
    DType("BOOL", "bool", 1, False),
    DType("U16", "uint16", 2, False),
    DType("U32", "uint32", 4, False),
    DType("U64", "uint64", 8, False),
    DType("F8_E4M3", "float8_e4m3fn", 1, True),
    DType("F8_E5M2", "float8_e5m2", 1, True),
)}
BY_NAME: dict[str, DType] = {d.name: d for d in BY_CODE.values()}
FLOAT32, FLOAT16, BFLOAT16 = BY_NAME["float32"], BY_NAME["float16"], BY_NAME["bfloat16"]
# The dtypes float32 holds exactly (a merge's float32 math widens them without rounding), with
# the type the compiled kernels read their bits as: numba has no 16-bit floats, and signedness
# tells bf16 from fp16 there (jit_kernels.widen).
EXACT_IN_FLOAT32: dict[DType, str] = {BFLOAT16: "uint16", FLOAT16: "int16", FLOAT32: "float32"}
# Their exponent bits: all set is an Inf or a NaN.
_EXPONENTS = {BFLOAT16: ("<u2", 0x7F80), FLOAT16: ("<u2", 0x7C00), FLOAT32: ("<u4", 0x7F800000)}
_FINITE_STEP = 1 << 20   # elements a step: the masked copy stays in the caches


@functools.cache
def _torch_dtype(name: str, code: str):
    import torch
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):   # the float8 and unsigned types exist only in newer torch builds
        raise MergeInputError(f"this torch ({torch.__version__}) has no {name}, the dtype {code} of an input; install "
                              f"a newer torch, or convert the model to another dtype.")
    return found


def all_finite(data: memoryview, dtype: DType) -> bool:
    """Whether stored values (bytes of a dtype in EXACT_IN_FLOAT32) hold no Inf or NaN, read from
    their bits with numpy: a copy checks its input without torch (~8 GB/s on one core)."""
    import numpy as np

    kind, mask = _EXPONENTS[dtype]
    bits = np.frombuffer(data, dtype=kind)
    masked = np.empty(min(bits.size, _FINITE_STEP), dtype=kind)
    for start in range(0, bits.size, _FINITE_STEP):
        step = bits[start:start + _FINITE_STEP]
        out = masked[:step.size]
        np.bitwise_and(step, mask, out=out)
        if out.max() == mask:
            return False
    return True


def of(dtype) -> DType:
    """The DType of a torch dtype (or a DType): torch.bfloat16 -> BFLOAT16."""
    if isinstance(dtype, DType):
        return dtype
    found = BY_NAME.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise MergeInputError(f"lines_fast does not read or write the dtype {dtype}; convert the tensor to one of "
                              f"{', '.join(BY_NAME)}.")
    return found
