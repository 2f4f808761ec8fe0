"""PEFT LoRA adapters as models: theta_i = theta_0 + scaling * B A, computed per tensor on the fly.

A model path that is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
stands for the fine-tune it encodes on top of the merge's base. `AdapterCheckpoint` is that
fine-tune as a virtual checkpoint: its tensor names are the base's, a tensor the adapter does
not touch is the base's own (tau = 0), a tensor it saves whole (modules_to_save, trained
biases) is the adapter's, and a LoRA-targeted weight W is

    f32(W) + scaling * (f32(B) @ f32(A))      (transposed with fan_in_fan_out; embeddings: (B A)^T)

computed in float32, a block of rows at a time (no second full-size temporary), when the merge
asks for it; it is never written out. scaling = lora_alpha / r, or lora_alpha / sqrt(r) with
use_rslora; rank_pattern and alpha_pattern override r and lora_alpha for the modules whose name
ends with a pattern (PEFT's rule: the pattern matches the whole name or a suffix after a '.').
Every method then sees an ordinary fine-tune. Refused, naming the adapter and the key: DoRA
(magnitude vectors), other PEFT types, keys for tensors the base lacks, and shapes that do not
fit the base.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .lazy import torch

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo
from .errors import MergeInputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|"
                       r"^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)$")
_ROWS = 4096   # rows of B A computed at a time


def is_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first pattern matching the module name or a suffix
    of it after a '.'."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


class AdapterCheckpoint:
    """The fine-tune a LoRA adapter encodes on top of `base`, as a checkpoint (see the module doc)."""

    def __init__(self, path: Path, base: Checkpoint, label: str):
        # Where B A is computed: the CPU, or the merge's GPU (the engine sets it for --device cuda).
        self.compute_device: str | torch.device = "cpu"
        self.path = Path(path)
        self.label = label
        self._base = base
        where = f"adapter {label}"
        try:
            cfg = json.loads((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MergeInputError(f"{where}: {self.path / CONFIG_FILE} is not valid JSON ({err}). Re-save the "
                                  "adapter with PEFT's save_pretrained.") from None
        if not isinstance(cfg, dict):
            raise MergeInputError(f"{where}: {self.path / CONFIG_FILE} is not a JSON object.")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise MergeInputError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; lines_fast merges "
                                  "LoRA adapters (merge other adapters into their base with PEFT first).")
        if cfg.get("use_dora"):
            raise MergeInputError(f"{where}: DoRA adapters (use_dora: true) are not supported: their magnitude "
                                  "vectors renormalise each column. Merge it with PEFT's merge_and_unload first.")
        weights = self.path / WEIGHTS_FILE
        if not weights.is_file():
            other = sorted(p.name for p in self.path.glob("adapter_model*"))
            raise MergeInputError(f"{where}: {weights} does not exist" + (f" (found {', '.join(other)}; convert it "
                                  "to safetensors)" if other else "") + ".")
        self._adapter = Checkpoint.open(weights, label=f"{label} ({weights.name})")
        try:
            r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (r, alpha)):
                raise MergeInputError(f"{where}: r and lora_alpha in {CONFIG_FILE} must be positive numbers, "
                                      f"got r={r!r}, lora_alpha={alpha!r}.")
            self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
            pairs: dict[str, dict] = {}   # module -> {"lora_A": key, "lora_B": key, "embedding": bool}
            self._whole: dict[str, str] = {}           # base name -> adapter key (saved whole)
            for key in self._adapter.tensors:
                if "lora_magnitude_vector" in key:
                    raise MergeInputError(f"{where}: '{key}' is a DoRA magnitude vector; DoRA is not supported. "
                                          "Merge it with PEFT's merge_and_unload first.")
                bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
                m = _LORA_KEY.match(bare)
                if m:
                    entry = pairs.setdefault(m.group("module") or m.group("emodule"), {"embedding": False})
                    entry[(m.group("part") or m.group("epart")).replace("lora_embedding_", "lora_")] = key
                    entry["embedding"] = entry["embedding"] or bool(m.group("epart"))
                else:
                    self._whole[bare] = key
            self._lora: dict[str, tuple[str, str, float, bool]] = {}   # base name -> (A key, B key, scaling, embedding)
            for module, parts in pairs.items():
                if "lora_A" not in parts or "lora_B" not in parts:
                    raise MergeInputError(f"{where}: module '{module}' has only "
                                          f"{'lora_A' if 'lora_A' in parts else 'lora_B'}; a LoRA module needs both "
                                          "lora_A and lora_B.")
                embedding = parts["embedding"]
                name = f"{module}.weight"
                if name not in base.tensors:
                    raise MergeInputError(f"{where}: '{parts['lora_A']}' adapts '{name}', which {base.label} does not "
                                          "have: the adapter was trained on another base model. Give the base it "
                                          "was trained on.")
                module_r = _pattern_value(cfg.get("rank_pattern"), module, r)
                module_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
                self._check_shapes(where, name, parts, module_r, embedding)
                scaling = module_alpha / (math.sqrt(module_r) if cfg.get("use_rslora") else module_r)
                self._lora[name] = (parts["lora_A"], parts["lora_B"], scaling, embedding)
            for name, key in self._whole.items():
                info, mine = base.tensors.get(name), self._adapter.tensors[key]
                if info is None:
                    raise MergeInputError(f"{where}: '{key}' (saved whole: modules_to_save or a trained bias) is "
                                          f"'{name}', which {base.label} does not have: the adapter was trained on "
                                          "another base model.")
                if info.shape != mine.shape:
                    raise MergeInputError(f"{where}: '{key}' has shape {list(mine.shape)} but '{name}' of "
                                          f"{base.label} has {list(info.shape)}: the adapter does not fit this base.")
        except BaseException:
            self._adapter.close()
            raise
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in base.tensors.items():
            if name in self._lora:
                self.tensors[name] = TensorInfo(name, dtypes.FLOAT32, info.shape, weights, 0, info.numel * 4)
            elif name in self._whole:
                self.tensors[name] = self._adapter.tensors[self._whole[name]]
            else:
                self.tensors[name] = info
        self.paths = [self.path]
        self.files = [weights, self.path / CONFIG_FILE]

    def _check_shapes(self, where: str, name: str, parts: dict, r, embedding: bool) -> None:
        a, b = self._adapter.tensors[parts["lora_A"]], self._adapter.tensors[parts["lora_B"]]
        w = self._base.tensors[name]
        rank = a.shape[0] if len(a.shape) == 2 else None
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or len(w.shape) != 2:
            raise MergeInputError(f"{where}: '{parts['lora_A']}' {list(a.shape)} and '{parts['lora_B']}' "
                                  f"{list(b.shape)} are not a LoRA pair for '{name}' {list(w.shape)} (A is "
                                  "[r, in], B is [out, r]); lines_fast merges LoRA on 2-D weights.")
        delta = (b.shape[0], a.shape[1])
        want = w.shape[::-1] if (embedding or self._fan_in_fan_out) else w.shape
        if tuple(delta) != tuple(want):
            raise MergeInputError(f"{where}: B A of '{parts['lora_A']}' is {list(delta)} but '{name}' of "
                                  f"{self._base.label} is {list(w.shape)}: the adapter was trained on a base of "
                                  "another shape. Give the base it was trained on.")
        if rank != r:
            raise MergeInputError(f"{where}: '{parts['lora_A']}' has rank {rank} but {CONFIG_FILE} says r = {r} "
                                  "(r or rank_pattern): the config and the weights disagree.")

    def source_of(self, name: str) -> str:
        if name in self._lora:
            return f"'{name}' of the base plus the LoRA update of {self.label}"
        return f"'{name}' of {self.label if name in self._whole else self._base.label}"

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._whole:
            return self._adapter.tensor(self._whole[name])
        if name not in self._lora:
            return self._base.tensor(name)
        a_key, b_key, scaling, embedding = self._lora[name]
        device = torch.device(self.compute_device)
        a = self._adapter.tensor(a_key).to(device, torch.float32)
        b = self._adapter.tensor(b_key).to(device, torch.float32)
        out = self._base.tensor(name).float()   # a float32 copy on the host: the fine-tune's values go here
        transpose = embedding or self._fan_in_fan_out
        rows = out.shape[0]
        for s in range(0, rows, _ROWS):
            e = min(rows, s + _ROWS)
            # Rows s..e of B A, or of (B A)^T = A^T B^T: columns s..e of A times B^T.
            block = (a[:, s:e].t() @ b.t()) if transpose else (b[s:e] @ a)
            if device.type == "cpu":
                out[s:e].add_(block.mul_(scaling))
            else:   # the GEMM and the add on the GPU, the rows back to the host
                out[s:e].copy_(out[s:e].to(device).add_(block.mul_(scaling)))
        return out

    def prefetch(self, name: str) -> None:
        if name not in self._lora and name not in self._whole:
            self._base.prefetch(name)

    def release(self, name: str) -> None:
        if name not in self._lora and name not in self._whole:
            self._base.release(name)

    def release_range(self, name: str, start: int, end: int) -> None:
        if name not in self._lora and name not in self._whole:
            self._base.release_range(name, start, end)

    def aux_files(self) -> list[Path]:
        return self._base.aux_files()

    def close(self) -> None:
        self._adapter.close()
