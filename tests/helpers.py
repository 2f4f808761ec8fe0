"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lines_fast import dtypes
from lines_fast.checkpoint import Checkpoint


def load(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (directory or file), copied out of the memory map."""
    with Checkpoint.open(path) as ckpt:
        return {name: ckpt.tensor(name).clone() for name in ckpt.tensors}


def write_safetensors(path, tensors, metadata=None) -> None:
    """A .safetensors file with the tensors stored in the dict's order (no reordering)."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        t = t.contiguous()
        data = bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        header[name] = {"dtype": dtypes.of(t.dtype).code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
