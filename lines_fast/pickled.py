"""PyTorch `.bin` checkpoints as inputs, read safely: plain tensors only, one shard at a time.

`pytorch_model.bin` (or a sharded `pytorch_model.bin.index.json`) is loaded with
`torch.load(weights_only=True, mmap=True)`: the unpickler accepts only tensors and plain
containers (no code runs), and the tensors' storages are memory maps of the file, so nothing is
read until a tensor is used and memory stays bounded. The headers pass loads each shard once for
names, shapes and dtypes; afterwards at most two shards are loaded at a time. Output is always
safetensors.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo, shard_name_is_inside
from .errors import MergeInputError

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_LOADED = 2   # shards kept loaded (mapped) at a time


def load_state_dict(file: Path, label: str) -> dict[str, torch.Tensor]:
    """One .bin file's tensors (memory-mapped), or a MergeInputError saying what is wrong."""
    where = f"'{file}'" if label == str(file) else f"checkpoint '{label}' ({file})"
    if not zipfile.is_zipfile(file):
        raise MergeInputError(
            f"{where} is not a PyTorch zip checkpoint (truncated, or saved by torch older than 1.6 or with "
            "_use_new_zipfile_serialization=False), so it cannot be read safely with memory maps. Re-save it "
            "with torch.save, or convert it to safetensors.")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise MergeInputError(
            f"{where} holds more than plain tensors (the safe loader refused: {str(err).splitlines()[0]}), and "
            "lines_fast never runs a pickle's code. Load it yourself in a trusted environment and save the state "
            "dict with safetensors.") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise MergeInputError(f"{where} cannot be read ({str(err).splitlines()[0]}): the file is truncated or "
                              "corrupt. Re-download or re-save it.") from None
    if not isinstance(sd, dict) or not sd:
        raise MergeInputError(f"{where} is a {type(sd).__name__}, not a state dict (a mapping of tensor names to "
                              "tensors). Save model.state_dict().")
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        nested = " (a training checkpoint? its weights may be under one key such as 'state_dict' or 'model')" \
            if isinstance(sd.get(bad), dict) else ""
        raise MergeInputError(f"{where}: entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor{nested}. Save "
                              "the model's state dict alone.")
    return sd


class PickledCheckpoint(Checkpoint):
    """A .bin checkpoint (one file or an index of shards) with the Checkpoint interface."""

    @classmethod
    def open_bin(cls, path: Path, label: str) -> "PickledCheckpoint":
        folder = path if path.is_dir() else path.parent
        if (path.is_dir() and (path / BIN_INDEX).is_file()) or path.name.endswith(".bin.index.json"):
            index = path / BIN_INDEX if path.is_dir() else path
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise MergeInputError(f"checkpoint '{label}': {index} is not a valid index ({err}). Re-download "
                                      "it.") from None
            outside = [s for s in shards if not shard_name_is_inside(s)]
            missing = [s for s in shards if s not in outside and not (folder / s).is_file()]
            if outside or missing:
                raise MergeInputError(f"checkpoint '{label}': {index} names shard "
                                      f"'{(outside or missing)[0]}', which " + ("is outside the model's directory"
                                      if outside else "does not exist") + ". Fix or re-download the checkpoint.")
            files = [folder / s for s in shards]
        else:
            files = [path / BIN_FILE if path.is_dir() else path]
            weight_map = None
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            sd = load_state_dict(file, label)
            for name, t in sd.items():
                if weight_map is not None and weight_map.get(name) != file.name:
                    continue   # only what the index lists is part of the model
                tensors[name] = TensorInfo(name, dtypes.of(t.dtype), tuple(t.shape), file, 0, t.numel() * t.element_size())
            del sd
        return cls(path, label, tensors, files)

    def __init__(self, path, label, tensors, files):
        super().__init__(path, label, tensors, files)
        self._loaded: OrderedDict[Path, dict[str, torch.Tensor]] = OrderedDict()

    def tensor(self, name: str) -> torch.Tensor:
        info = self.info(name)
        self._check_unchanged(info.file)
        sd = self._loaded.get(info.file)
        if sd is None:
            sd = load_state_dict(info.file, self.label)
            self._loaded[info.file] = sd
            while len(self._loaded) > _LOADED:
                self._loaded.popitem(last=False)
        else:
            self._loaded.move_to_end(info.file)
        return sd[name]

    def prefetch(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def release_range(self, name: str, start: int, end: int) -> None:
        pass

    def close(self) -> None:
        self._loaded.clear()
        super().close()
