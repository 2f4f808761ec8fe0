"""The streaming merge engine: checkpoints in, one merged checkpoint out, bounded memory.

Flow: open the inputs (headers only) -> check that they fit together -> plan the passes ->
statistics passes if the method needs whole-model numbers -> the merge pass, which streams
one tensor at a time from the memory maps through the backend into the shard writer.
Peak memory is a few chunks of scratch plus one output tensor, whatever the depth: each
input tensor's pages are released once it is merged.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .lazy import torch

from . import __version__
from .backends.base import STREAM_MIN, MergeJob
from .checkpoint import Checkpoint, TensorInfo, aux_files_in
from .config import MergeConfig, from_yaml_dict, load_yaml, model_key, validate, with_overrides
from .dtypes import DType
from .distributed import RankFailure, World, assign_shards, current_world
from .errors import MergeInputError, NonFiniteInput, OutputWriteError
from .layers import depth_fractions, lines_scales
from . import dtypes, jit, lazy, realign, tokenizer_files, vocabulary
from .lora import AdapterCheckpoint, is_adapter
from .settings import filters as filters_of
from .slices import SlicedCheckpoint
from .plan import ElementPlan
from .planning import Pass, RunStats, auto_alpha, describe, plan_passes
from .progress import Progress, say
from .spec import MethodSpec
from .writer import (PARTIAL_SUFFIX, OutputLock, ShardedWriter, check_output_dir, different_merge_error, parse_size,
                     group_by_size)

# Tensors under PACK_TENSOR_MAX elements are merged packed, up to PACK_ELEMENTS a job, where the
# plan is elementwise: below ~64K elements a tensor's fixed cost (Python, the ops' dispatch)
# outweighs its arithmetic.
PACK_TENSOR_MAX = 1 << 16
PACK_ELEMENTS = 1 << 20

_VOCAB_NAMES = re.compile(r"embed|lm_head|wte|word_embeddings|embed_out|shared\.weight|output\.weight")


# MergeResult.summary()'s timing, as the benchmarks read it: "in S s[ (+T s importing torch)]: read B GB|MB".
SUMMARY_TIMES = re.compile(r" in ([0-9.]+) s(?: \(\+([0-9.]+) s importing torch\))?: read ([0-9.]+) (GB|MB)")


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    backend: str
    passes: list[str]
    merged_tensors: int
    copied_tensors: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    alpha: float | None = None
    global_thresholds: tuple[float, ...] | None = None
    ranks: list[dict] | None = None   # a distributed merge: each rank's tensors, bytes read, seconds
    import_seconds: float = 0.0   # importing torch once the checks passed: not in `seconds`

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0

    def _plus_import(self) -> str:
        return f" (+{self.import_seconds:.2f} s importing torch)" if self.import_seconds >= 0.01 else ""

    def summary(self) -> str:
        text = (f"merged {self.merged_tensors} tensors ({self.method}, {self.backend}) "
                f"in {self.seconds:.2f} s{self._plus_import()}: read {human_bytes(self.bytes_read)} "
                f"({self.read_gbps:.2f} GB/s), wrote {human_bytes(self.bytes_written)} "
                f"in {len(self.passes)} pass{'es' if len(self.passes) > 1 else ''} -> {self.out_dir}")
        if self.alpha is not None:
            text += f"; LiNeS alpha = {self.alpha:.6g}"
        if self.ranks:
            slowest = max(r["seconds"] for r in self.ranks)
            text += f"\n{len(self.ranks)} ranks (the slowest took {slowest:.2f} s):"
            for r, share in enumerate(self.ranks):
                text += (f"\n  rank {r} on {share['device']}: {share['shards']} shard(s), {share['tensors']} tensors, "
                         f"read {human_bytes(share['bytes_read'])}, {share['seconds']:.2f} s")
        return text


@dataclass
class _Inputs:
    """The opened checkpoints: the base (or None) and the fine-tuned models, in config order."""

    base: Checkpoint | None
    models: list[Checkpoint]
    # With slices (lines_fast/slices.py): each tensor's mergekit position t, and the output's layer count.
    depths: dict[str, float] | None = None
    layers: int | None = None
    slice_of: dict[str, int] | None = None   # each output tensor's slice
    # With tokenizer_source / tokenizer: the output vocabulary (None: the source's tokenizer is copied).
    vocabulary: "vocabulary.Built | None" = None

    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    def close(self) -> None:
        for ckpt in self.all():
            ckpt.close()


@dataclass
class _Plan:
    order: list[str]                       # output tensor order (the reference checkpoint's order)
    merged: list[str]                      # float tensors that are merged
    copied: dict[str, str]                 # name -> why it is copied unchanged
    out_dtypes: dict[str, DType]
    shapes: dict[str, tuple[int, ...]]
    substitutes: dict[tuple[int, str], str] = field(default_factory=dict)  # (model, name) -> "base"


def _log_to_stderr(message: str) -> None:
    say(message)


# A GPU driver's files: NVIDIA's (a container with the NVIDIA runtime has them too), WSL2's, ROCm's.
_GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a Linux machine with no GPU driver's
    files: there `plan` and a merge's checks stay torch-free."""
    if ("torch" not in sys.modules and sys.platform.startswith("linux")
            and not any(os.path.exists(f) for f in _GPU_DRIVER_FILES)):
        return False
    return torch.cuda.is_available()


def resolve_device(device: str, log: Callable[[str], None] = _log_to_stderr) -> str:
    """cpu, cuda or interpret for --device auto|cpu|cuda|interpret."""
    if device not in ("auto", "cpu", "cuda", "interpret"):
        raise MergeInputError(f"--device must be auto, cpu, cuda or interpret, got {device!r}.")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
        if device == "cuda" and importlib.util.find_spec("triton") is None:
            log("a GPU is visible but triton is not installed: merging on the CPU (pip install triton for the GPU)")
            device = "cpu"
    return device


def make_backend(device: str, allow_nonfinite: bool = False, log: Callable[[str], None] = _log_to_stderr,
                 local_rank: int | None = None):
    """The backend for --device auto|cpu|cuda|interpret; local_rank: a distributed rank's GPU."""
    device = resolve_device(device, log)
    if device == "cpu":
        from .backends.cpu import CpuBackend
        return CpuBackend(check_finite=not allow_nonfinite)
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeInputError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu "
                              "(or auto), or --device interpret to run the Triton kernels on the CPU.")
    try:
        from .backends.triton_backend import TritonBackend
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
        return TritonBackend(device, check_finite=not allow_nonfinite)
    except ImportError as err:
        raise MergeInputError(f"--device {device} needs triton ({err}); pip install triton, "
                              "or use --device cpu.") from None
    except RuntimeError as err:
        # The environment, not the inputs: TRITON_INTERPRET set for a GPU run, kernels imported
        # in the other mode, or the GPU not usable.
        raise MergeInputError(f"--device {device}: {err}") from None


def load_config(config_or_path: Any) -> MergeConfig:
    if isinstance(config_or_path, MergeConfig):
        return validate(config_or_path)
    if isinstance(config_or_path, dict):
        return from_yaml_dict(config_or_path, "config")
    return load_yaml(Path(config_or_path))


@contextlib.contextmanager
def _few_collections():
    """Python's cyclic garbage collector, tamed for the run. Reading the headers of a checkpoint
    of 10^4-10^5 tensors allocates objects by the hundred thousand, and each such burst set off
    full collections that walked every object torch's import had made: 60-80% of the time of a
    20,000-tensor merge. The objects alive now are set aside (gc.freeze) and young collections
    come 100x less often; tensors are freed by reference counts as before, and what cycles the
    run leaves are collected at the end."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], 70_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


# -- opening and checking the inputs ------------------------------------------------------
def open_inputs(config: MergeConfig, log: Callable[[str], None] = _log_to_stderr) -> _Inputs:
    """The config's checkpoints, headers read: the base and the models, or with slices their
    virtual checkpoints (each role's layer ranges renumbered into the output's layers); with a
    tokenizer_source, every vocabulary tensor's rows in the output vocabulary's order."""
    inputs = _open(config)
    try:
        if config.tokenizer is not None:
            _realign_vocabulary(config, inputs, log)
        else:
            _warn_if_vocabularies_differ(inputs, log)
    except BaseException:
        inputs.close()
        raise
    return inputs


def _warn_if_vocabularies_differ(inputs: _Inputs, log: Callable[[str], None]) -> None:
    """Without tokenizer_source the embedding and lm_head rows are merged by id, as mergekit merges
    them: say so where the inputs' tokenizer.json files give some ids to other tokens (a silent
    mix of unrelated rows otherwise). Unreadable tokenizers are left to a tokenizer_source merge."""
    every = [c for c in inputs.all() if Path(c.path).is_dir()]   # a lone file's neighbours need not be its own
    present = [(c, Path(c.path) / "tokenizer.json") for c in every if (Path(c.path) / "tokenizer.json").is_file()]
    if len(present) < 2:
        return
    try:
        first = present[0][1].read_bytes()
        if all(f.read_bytes() == first for _, f in present[1:]):
            return
        vocabs = [(c, vocabulary.read(f.parent, c.label)) for c, f in present]
    except (OSError, MergeInputError):
        return
    (ref_ckpt, ref), *others = vocabs
    ref_tokens = {i: t for t, i in ref.ids.items()}
    for ckpt, vocab in others:
        tokens = {i: t for t, i in vocab.ids.items()}
        moved = sorted(i for i in set(ref_tokens) | set(tokens) if ref_tokens.get(i) != tokens.get(i))
        if moved:
            shown = ", ".join(f"{i}: {ref_tokens.get(i)!r} vs {tokens.get(i)!r}" for i in moved[:3])
            log(f"warning: the tokenizer of {ckpt.label} gives {len(moved)} token id(s) to other tokens than "
                f"{ref_ckpt.label}'s ({shown}{', ...' if len(moved) > 3 else ''}). Without tokenizer_source the "
                "embedding and lm_head rows are merged by id, as mergekit merges them, so those rows mix unrelated "
                "tokens; add `tokenizer_source: union` (or base) to merge them token by token.")


def _realign_vocabulary(config: MergeConfig, inputs: _Inputs, log: Callable[[str], None]) -> None:
    """Build the output vocabulary (lines_fast/vocabulary.py) and wrap the inputs whose rows move
    (lines_fast/realign.py)."""
    from .slices import same_model

    every = inputs.all()
    base_index = 0 if inputs.base is not None else None
    try:
        built = vocabulary.build(config.tokenizer, [c.path for c in every], [c.label for c in every], base_index, log)
    except MergeInputError as err:
        raise MergeInputError(f"{config.source}: {err}") from None
    if built is None:
        log(f"tokenizer_source: {config.tokenizer.source}: no model has a tokenizer.json, so there is no vocabulary "
            "to realign to: copying its tokenizer files as they are")
        return
    inputs.vocabulary = built

    def model_index(path: Path) -> int | None:
        return next((j for j, c in enumerate(every) if same_model(c.path, path)), None)

    try:
        aligned = realign.realigned(every, built, config.tokenizer, base_index, model_index)
    except MergeInputError as err:
        raise MergeInputError(f"{config.source}: {err}") from None
    if aligned is every:
        return
    if config.slices:
        raise MergeInputError(f"{config.source}: the models' vocabularies differ, and realigning embedding rows "
                              "of sliced inputs is not supported (mergekit realigns the rows of each slice's "
                              "sources); merge whole models (models:), or give models of one vocabulary.")
    if inputs.base is not None:
        inputs.base, inputs.models = aligned[0], aligned[1:]
    else:
        inputs.models = aligned


def _open(config: MergeConfig) -> _Inputs:
    if config.slices:
        from .slices import views
        sliced = views(config.slices, lambda p: Checkpoint.open(p, label=str(p)), config.source)
        return _Inputs(sliced.base, sliced.models, sliced.depths, sliced.layers, sliced.slice_of)
    opened: list[Checkpoint] = []
    try:
        base = None
        if config.base is not None:
            base = Checkpoint.open(config.base, label=f"base model {config.base}")
            opened.append(base)
        models = []
        for i, path in enumerate(config.models):
            # As the user named it: the YAML's models[j] (what the config messages say too), or the i-th --model.
            label = f"{'model ' + str(i + 1) if config.source == 'command line' else model_key(config, i)} ({path})"
            if is_adapter(path):   # a PEFT LoRA adapter: the fine-tune it encodes on the base
                if base is None:
                    raise MergeInputError(f"{config.source}: {label} is a LoRA adapter; it needs the base model "
                                          "it was trained on (base_model / --base).")
                models.append(AdapterCheckpoint(path, base, label))
            else:
                models.append(Checkpoint.open(path, label=label))
            opened.append(models[-1])
        return _Inputs(base, models)
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise


def _plan_tensors(config: MergeConfig, inputs: _Inputs, log: Callable[[str], None]) -> _Plan:
    """Decide, tensor by tensor, what is merged and what is copied, and check the inputs agree."""
    reference = inputs.base or inputs.models[0]
    exclude = [re.compile(p) for p in config.exclude]
    plan = _Plan(order=list(reference.tensors), merged=[], copied={}, out_dtypes={}, shapes={})
    for i, model in enumerate(inputs.models):
        extra = [n for n in model.tensors if n not in reference.tensors]
        if extra:
            raise MergeInputError(
                f"{model.label} has {len(extra)} tensor(s) that {reference.label} lacks, e.g. '{extra[0]}' "
                f"(in {model.tensors[extra[0]].file}). "
                "lines_fast merges the tensors of the base; check that the models share an architecture, "
                "or merge from a base that has these tensors.")
    tables = [(i, model, model.tensors) for i, model in enumerate(inputs.models)]
    for name in plan.order:
        info = reference.tensors[name]
        plan.shapes[name] = info.shape
        if not info.dtype.is_floating_point:
            plan.copied[name] = f"not floating point ({info.dtype})"
            plan.out_dtypes[name] = info.dtype
            _check_copied(name, reference, inputs.models, log)
            continue
        if exclude and any(p.search(name) for p in exclude):
            plan.copied[name] = "excluded"
            plan.out_dtypes[name] = info.dtype
            continue
        for i, model, table in tables:
            other = table.get(name)
            if other is None:
                if config.missing == "copy-base" and inputs.base is not None:
                    plan.substitutes[(i, name)] = "base"
                    continue
                fix = ("If that model simply never changed it, rerun with --missing copy-base to use the "
                       "base's value for it." if inputs.base is not None else
                       "Without a base there is no value to substitute: check that the models share an "
                       "architecture, or give a base model (--base) and --missing copy-base.")
                raise MergeInputError(
                    f"tensor '{name}' is in {reference.label} ({info.file}) but missing from {model.label} "
                    f"({len(model.tensors)} tensors). {fix}")
            if not other.dtype.is_floating_point:
                raise MergeInputError(
                    f"tensor '{name}' is floating point in {reference.label} ({info.dtype}) but "
                    f"{other.dtype} in {model.label} ({other.file}); the checkpoints do not match.")
            if other.shape != info.shape:
                raise MergeInputError(_shape_message(name, reference, info, model, other))
        plan.merged.append(name)
        plan.out_dtypes[name] = config.out_dtype or info.dtype
    if plan.copied:
        non_float = [n for n, why in plan.copied.items() if why.startswith("not floating")]
        if non_float:
            log(f"copying {len(non_float)} non-float tensor(s) from {reference.label} unchanged: "
                + ", ".join(non_float[:5]) + (" ..." if len(non_float) > 5 else ""))
        excluded = [n for n, why in plan.copied.items() if why == "excluded"]
        if excluded:
            log(f"copying {len(excluded)} excluded tensor(s) from {reference.label} unchanged")
    if plan.substitutes:
        log(f"--missing copy-base: {len(plan.substitutes)} (model, tensor) pair(s) take the base's value")
    if not plan.merged:
        raise MergeInputError(f"{reference.label}: no floating-point tensors to merge "
                              "(all are non-float or excluded).")
    return plan


def _stored_in(holder, name: str) -> tuple:
    """The checkpoint that stores `holder`'s tensor `name` (a sliced view's source), and its name there."""
    return holder.stored(name) if isinstance(holder, SlicedCheckpoint) else (holder, name)


def _same_values(name: str, a, b) -> bool:
    """Whether a non-float tensor holds the same values in two inputs. Both safetensors (the usual
    case): their stored bytes, compared without torch, so checking the inputs does not load it."""
    (a, in_a), (b, in_b) = _stored_in(a, name), _stored_in(b, name)
    if type(a) is Checkpoint and type(b) is Checkpoint:
        return bytes(a.raw_view(in_a)) == bytes(b.raw_view(in_b))
    return torch.equal(a.tensor(in_a), b.tensor(in_b))


def _check_copied(name: str, reference: Checkpoint, models: list[Checkpoint], log: Callable[[str], None]) -> None:
    """A non-float tensor is copied from the reference: refuse it where a model's has another shape
    (the checkpoints do not match), and say so where its values differ (the copy keeps one)."""
    info = reference.tensors[name]
    differ = []
    for model in models:
        other = model.tensors.get(name)
        if other is None:
            continue
        if other.shape != info.shape or other.dtype != info.dtype:
            raise MergeInputError(
                f"tensor '{name}' ({info.dtype}, not merged: copied) has shape {list(info.shape)} {info.dtype} in "
                f"{reference.label} ({info.file}) but {list(other.shape)} {other.dtype} in {model.label} "
                f"({other.file}); the checkpoints do not match. Check that the models share an architecture.")
        if other.nbytes <= 64 << 20 and not _same_values(name, model, reference):
            differ.append(model.label)
    if differ:
        log(f"warning: non-float tensor '{name}' differs between {reference.label} and {', '.join(differ)}; "
            f"it is not merged: the output takes {reference.label}'s")


def _inputs_key(inputs: _Inputs) -> str:
    """The identity of every input file (path, size, mtime): --resume refuses partial output
    written from other files, e.g. a model re-downloaded or re-saved in between."""
    files = []
    for ckpt in inputs.all():
        for f in ckpt.files:
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    if inputs.vocabulary is not None:   # a tokenizer edited in between moves the rows: not the same merge
        built = inputs.vocabulary
        digest = hashlib.sha256(json.dumps(sorted(built.ids.items()), ensure_ascii=False).encode("utf-8"))
        for m in built.row_maps:
            digest.update(m.numpy().tobytes())
        files.append(["vocabulary", built.rows, digest.hexdigest()])
    return json.dumps(files)


def _shape_message(name: str, reference: Checkpoint, info: TensorInfo, model: Checkpoint, other: TensorInfo) -> str:
    text = (f"tensor '{name}' has shape {list(info.shape)} in {reference.label} ({info.file}) but "
            f"{list(other.shape)} in {model.label} ({other.file}). Shapes must match exactly; lines_fast "
            "never broadcasts.")
    if (_VOCAB_NAMES.search(name) and len(info.shape) == len(other.shape) == 2
            and info.shape[1] == other.shape[1]):
        text += (f" This is the vocabulary size ({info.shape[0]} vs {other.shape[0]} rows): the model's "
                 "embeddings were resized for added tokens. Resize all models to one vocabulary first "
                 "(e.g. model.resize_token_embeddings in transformers, then save), or use the model with "
                 "the extra tokens as the base.")
    return text


class Engine:
    def __init__(self, config: MergeConfig, out_dir: Path, *, device: str = "auto",
                 max_shard_size: int | str = "5GB", force: bool = False, resume: bool = False,
                 progress: bool | None = None, log: Callable[[str], None] | None = None,
                 world: World | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.max_shard_size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        self.force = force
        self.resume = resume
        self.progress = progress
        self.log = log or _log_to_stderr
        # torchrun's world (size 1 without it): rank 0 speaks for the run, the others are quiet.
        self.world = world or current_world()
        if not self.world.is_root:
            self.log, self.progress = (lambda message: None), False
        self.spec: MethodSpec = config.method_spec()
        self.plan = ElementPlan.from_spec(self.spec)
        self._tensor_specs: dict[str, MethodSpec] = {}
        self._plans: dict[MethodSpec, ElementPlan] = {}
        self._depths: dict[str, float] | None = None
        self._slice_of: dict[str, int] | None = None

    def _spec_for(self, name: str) -> MethodSpec:
        """Tensor `name`'s spec: the config's, or resolved at its depth where parameters are
        per-layer lists or filtered (config.MergeConfig.spec_for_tensor)."""
        if not self.config.per_tensor:
            return self.spec
        if name not in self._tensor_specs:
            if self._depths is None:
                raise RuntimeError("per-tensor specs need the tensor list first (_resolve_tensor_specs)")
            slice_index = self._slice_of.get(name) if self._slice_of else None
            self._tensor_specs[name] = self.config.spec_for_tensor(name, self._depths[name], slice_index)
        return self._tensor_specs[name]

    def _plan_for(self, name: str) -> ElementPlan:
        spec = self._spec_for(name)
        if spec is self.spec:
            return self.plan
        if spec not in self._plans:
            self._plans[spec] = ElementPlan.from_spec(spec)
        return self._plans[spec]

    def _resolve_tensor_specs(self, merged: list[str], depths: dict[str, float] | None = None) -> None:
        """Resolve (and so validate) every tensor's spec before any work, where they vary; depths:
        each tensor's position t where slices give it (else from the names)."""
        if not self.config.per_tensor:
            return
        pattern = self.spec.lines.layer_pattern if self.spec.lines is not None else None
        given = [(k, v) for _, model_values, values, _ in (self.config.slice_inputs or [self.config.spec_inputs])
                 for k, v in [*values.items(), *((k, v) for k, vs in model_values.items() for v in vs)]]
        for key, value in given:
            for substring in filters_of(value):
                if not any(substring in name for name in merged):
                    raise MergeInputError(
                        f"{self.config.source}: the filter {substring!r} of {key} matches none of the "
                        f"{len(merged)} merged tensors (e.g. {merged[0]}), so that entry would never apply. "
                        "Fix the substring (filters match any part of a tensor name), or remove the entry.")
        self._depths = depths if depths is not None else depth_fractions(merged, pattern)
        for name in merged:
            self._spec_for(name)
        distinct = len(set(self._tensor_specs.values()))
        self.log(f"per-layer / filtered parameters: {distinct} distinct parameter set(s) over {len(merged)} tensors")

    @property
    def _reads_base(self) -> bool:
        return self.spec.uses_base or self.config.base_is_input

    # The inputs of tensor `name` for the backend: zero-copy views of the memory maps.
    def _base_tensor(self, inputs: _Inputs, name: str) -> torch.Tensor | None:
        return inputs.base.tensor(name) if inputs.base is not None else None

    def _model_tensors(self, inputs: _Inputs, plan: _Plan, name: str) -> list[torch.Tensor]:
        """The plan's inputs for tensor `name`: the models, after the base where it is averaged in."""
        averaged = [inputs.base.tensor(name)] if self.config.base_is_input else []
        return averaged + [inputs.base.tensor(name) if (i, name) in plan.substitutes else m.tensor(name)
                           for i, m in enumerate(inputs.models)]

    def _stored_copy(self, inputs: _Inputs, plan: _Plan, name: str, scale: float | None = None):
        """(checkpoint, name there) of the one input tensor `name`'s output is, byte for byte: a plan
        that copies its input (at this scale), into the dtype that input is stored in, read from a
        safetensors file. The merge pass writes those bytes from the memory map, without a backend or
        torch; else None."""
        el = self._plan_for(name) if scale is None else self._plan_for(name).at_scale(scale)
        if not el.copies_input:
            return None
        holder = inputs.base if self.config.base_is_input or (0, name) in plan.substitutes else inputs.models[0]
        ckpt, stored = _stored_in(holder, name)
        dtype = ckpt.tensors[stored].dtype if type(ckpt) is Checkpoint else None
        if dtype not in dtypes.EXACT_IN_FLOAT32 or dtype is not plan.out_dtypes[name]:
            return None
        return ckpt, stored

    def _prefetch(self, inputs: _Inputs, name: str | None) -> None:
        """Ask the kernel to start reading a coming tensor's pages (MADV_WILLNEED) on every
        input: it reads ahead with many I/Os in flight while the current tensor computes."""
        if name is None:
            return
        for ckpt in inputs.all():
            if name in ckpt.tensors:
                ckpt.prefetch(name)

    def _releaser(self, inputs: _Inputs, name: str):
        """release(start, end) for a job: unmap elements start..end of tensor `name` on every input."""
        holders = [ckpt for ckpt in inputs.all() if name in ckpt.tensors]

        def release(start: int, end: int) -> None:
            for ckpt in holders:
                ckpt.release_range(name, start, end)
        return release

    def _release(self, inputs: _Inputs, name: str) -> None:
        for ckpt in inputs.all():
            if name in ckpt.tensors:
                ckpt.release(name)

    def _input_bytes(self, inputs: _Inputs, names: list[str]) -> int:
        tables = [c.tensors for c in ([inputs.base] if inputs.base is not None and self._reads_base else [])
                  + inputs.models]
        return sum(info.nbytes for table in tables for info in map(table.get, names) if info is not None)

    def _nonfinite(self, err: NonFiniteInput, inputs: _Inputs, plan: _Plan, name: str) -> MergeInputError:
        # A backend may not know which input it was reading (a histogram has no model index):
        # name the input that really holds NaN/Inf, trying the reported one first.
        candidates = ([(-1, inputs.base)] if inputs.base is not None and self._reads_base else []) + [
            (-1, inputs.base) if (i, name) in plan.substitutes else (i, m) for i, m in enumerate(inputs.models)]
        candidates.sort(key=lambda c: c[0] != err.model_index)
        found = [c for c in candidates if not bool(torch.isfinite(c[1].tensor(name)).all())]
        _, ckpt = (found or candidates)[0]
        info = ckpt.tensors[name]
        return MergeInputError(
            f"tensor '{name}' of {ckpt.label} ({info.file}) contains NaN or Inf values. A merge of it would "
            "spread them; check that checkpoint (a diverged fine-tune?), exclude the tensor with --exclude, "
            "or pass --allow-nonfinite to merge anyway.")

    def _resumed_stats(self, merge_key: str, passes: list[Pass]) -> RunStats | None:
        """--resume: the interrupted run's statistics when it was this very merge; refuses another
        merge at once; None where there is nothing to resume from (or an older journal)."""
        notes = ShardedWriter.read_notes(self.out_dir)
        if notes is None or "merge" not in notes:
            return None
        if notes["merge"] != merge_key:
            raise different_merge_error(self.out_dir.with_name(self.out_dir.name + PARTIAL_SUFFIX))
        try:
            stats = RunStats.from_json(notes.get("stats") or {})
        except (TypeError, ValueError, AttributeError):
            return None
        spec = self.spec
        if ((auto_alpha(spec) and stats.alpha is None)
                or (self.plan.global_thresholds and stats.global_thresholds is None)
                or (self.plan.official and stats.majority_sign is None)):
            return None  # not journaled (an older run): compute them again
        skipped = [p.name for p in passes if p.name != "merge"]
        if skipped:
            found = " and ".join(what for what, value in (("α", stats.alpha), ("global thresholds",
                                                           stats.global_thresholds)) if value is not None)
            self.log(f"--resume: reusing the {found} of the interrupted run; statistics pass(es) "
                     f"{', '.join(skipped)} skipped")
        return stats

    def _stats_passes(self, passes: list[Pass], inputs: _Inputs, plan: _Plan, backend, names: list[str]) -> RunStats:
        """Run every pass before the merge pass: each reads every merged tensor of `names` (this
        rank's) once, combines what every rank found, and leaves what it produces in the RunStats."""
        stats = RunStats()
        total_elements = sum(math.prod(plan.shapes[name]) for name in plan.merged)
        for index, p in enumerate(passes):
            if p.writes:
                break
            label = f"pass {index + 1}/{len(passes)}"
            reason = p.skip_reason(stats)
            if reason is not None:
                self.log(f"{label} ({p.name}) not needed: {reason}")
                continue
            t0 = time.perf_counter()
            bar = Progress(f"{label} {p.name}", self._input_bytes(inputs, names), enabled=self.progress,
                           tensors=len(names))
            p.start(stats, self.plan)
            for k, name in enumerate(names):
                self.world.phase = f"pass {p.name}, tensor '{name}'"
                self._prefetch(inputs, names[k + 1] if k + 1 < len(names) else None)
                job = MergeJob(name, self._base_tensor(inputs, name), self._model_tensors(inputs, plan, name),
                               stats.for_tensor(name), 1.0, torch.float32, release=self._releaser(inputs, name))
                try:
                    with backend.releasing(job):
                        p.tensor(backend, self._plan_for(name), job, stats)
                except NonFiniteInput as err:
                    raise self._nonfinite(err, inputs, plan, name) from None
                self._release(inputs, name)
                bar.advance(self._input_bytes(inputs, [name]))
            bar.close()
            self.world.phase = f"pass {p.name}, combining the ranks' statistics"
            p.gather(stats, self.world)
            p.finish(stats, self.plan, total_elements, self.log)
            stats.passes_run += 1
            self.log(f"{label} ({p.name}) took {time.perf_counter() - t0:.2f} s")
        if stats.global_thresholds is not None:
            self.log("global trim thresholds: " + ", ".join(
                f"model {i + 1}: {t:.6g}" for i, t in enumerate(stats.global_thresholds)))
        return stats

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> MergeResult:
        started = time.perf_counter()
        with _few_collections(), jit.compile_notices(self.log):
            return self._run_locked(started)

    def _run_locked(self, started: float) -> MergeResult:
        world = self.world
        try:
            if world.size > 1:
                world.join(use_cuda=resolve_device(self.device, self.log) == "cuda")
            # One lock for the run, held by rank 0, which alone creates, cleans and publishes.
            with OutputLock(self.out_dir) if world.is_root else nullcontext():
                return self._run(started)
        except RankFailure:
            raise   # the group knows already
        except Exception as err:
            where = f" ({world.phase})" if world.size > 1 else ""
            if world.fail(str(err) if isinstance(err, MergeInputError) else f"{type(err).__name__}: {err}{where}"):
                err.shown_by_rank0 = True   # the CLI prints it once, on rank 0
            raise

    def _run(self, started: float) -> MergeResult:
        config, spec, world = self.config, self.spec, self.world
        for notice in config.notices:
            self.log(notice)
        inputs = open_inputs(config, self.log)
        writer = None
        try:
            # Every path the merge reads, links resolved by check_output_dir: nothing it reads may
            # be where it writes.
            read = [p for c in inputs.all() for p in [*c.paths, *c.files]]
            if config.tokenizer is not None and isinstance(config.tokenizer.source, Path):
                read.append(config.tokenizer.source)
            check_output_dir(self.out_dir, read, force=self.force, resume=self.resume)
            tok_files = self._tokenizer_files(inputs)
            plan = _plan_tensors(config, inputs, self.log)
            self._slice_of = inputs.slice_of
            self._resolve_tensor_specs(plan.merged, inputs.depths)
            # The checks so far read headers only, without torch (lazy.py): a refused merge is refused
            # in a fraction of a second. The data path needs it from here, unless every output tensor
            # is an input's stored bytes (passthrough), which the merge pass copies without it.
            copies_only = all(self._stored_copy(inputs, plan, n) is not None for n in plan.merged)
            import_seconds = 0.0 if copies_only else lazy.load()
            started += import_seconds
            backend = make_backend(self.device, allow_nonfinite=config.allow_nonfinite, log=self.log,
                                   local_rank=world.local_rank if world.size > 1 else None)
            device = str(getattr(backend, "device", "cpu"))
            if device.startswith("cuda"):   # adapters' B A as GEMMs on the merge's GPU
                for model in inputs.models:
                    adapter = getattr(model, "_inner", model)
                    if isinstance(adapter, AdapterCheckpoint):
                        adapter.compute_device = device
            reason = backend.supports(self.plan)
            if reason is not None:
                raise MergeInputError(f"--device {self.device}: the {backend.name} backend cannot run {config.method} "
                                      f"({reason}); use --device cpu.")
            passes = plan_passes(spec, finetuned=self.config.finetuned_models)
            self.log(describe(passes))
            entries = [(n, plan.out_dtypes[n], plan.shapes[n]) for n in plan.order]
            out_bytes = sum(math.prod(s) * d.itemsize for _, d, s in entries)
            self._check_disk(out_bytes)
            # Everything that decides the output and is known before any pass: a resume of
            # another merge is refused here, before the statistics passes, not after them.
            merge_parts = {"config": config.recipe(), "inputs": _inputs_key(inputs),
                           "layout": [str(self.max_shard_size), [[n, str(d), list(s)] for n, d, s in entries]]}
            merge_key = hashlib.sha256(json.dumps(
                [__version__, merge_parts["config"], merge_parts["inputs"], *merge_parts["layout"]],
                sort_keys=True, default=str).encode("utf-8")).hexdigest()
            self._agree(merge_parts, backend.name)
            owners, mine = self._assign_shards(inputs, plan, entries)
            my_merged = [n for n in plan.merged if n in mine]
            backend.expect(self.plan, sum(math.prod(plan.shapes[n]) for n in my_merged) * len(inputs.models))
            stats = self._resumed_stats(merge_key, passes) if self.resume else None
            # Every rank read the same journal; rank 0's reading decides for all.
            world.phase = "reading the journal" if self.resume else "starting"
            chosen = world.exchange(None if stats is None else stats.to_json())[0]
            stats = None if chosen is None else RunStats.from_json(chosen)
            if stats is None:
                stats = self._stats_passes(passes, inputs, plan, backend, my_merged)
            scales = self._scales(plan, stats)
            metadata = {
                "lines_fast_version": __version__,
                "lines_fast_recipe": json.dumps(config.recipe(), sort_keys=True),
            }
            if stats.alpha is not None:
                metadata["lines_fast_alpha"] = repr(stats.alpha)
            writer = ShardedWriter(self.out_dir, entries, max_shard_size=self.max_shard_size,
                                   metadata=metadata, resume=self.resume, overwrite=self.force,
                                   resume_key=_inputs_key(inputs),
                                   notes={"merge": merge_key, "stats": stats.to_json()},
                                   world=world, owners=owners)
            pending = writer.pending_names()
            if self.resume:
                done = sum(len(s.names) for s in writer.shards if s.file in writer.done_shards)
                self.log(f"--resume: {done} of {len(plan.order)} tensors ({len(writer.done_shards)} of "
                         f"{len(writer.shards)} shards) already written and verified; continuing")
            bytes_read = self._merge_pass(passes, inputs, plan, backend, writer, pending, stats, scales)
            bytes_read += self._input_bytes(inputs, my_merged) * stats.passes_run
            world.phase = "reporting its share"
            shares = world.exchange({"device": str(getattr(backend, "device", backend.name)),
                                     "shards": owners.count(world.rank), "tensors": len(mine),
                                     "bytes_read": bytes_read, "seconds": time.perf_counter() - started})
            with tempfile.TemporaryDirectory() as tmp:
                writer.finish(self._aux_files(inputs, plan, Path(tmp), tok_files))
            return MergeResult(
                out_dir=self.out_dir, method=config.method, backend=backend.name,
                passes=[p.name for p in passes], merged_tensors=len(plan.merged),
                copied_tensors=list(plan.copied), bytes_read=sum(s["bytes_read"] for s in shares),
                bytes_written=out_bytes, seconds=time.perf_counter() - started, alpha=stats.alpha,
                global_thresholds=stats.global_thresholds, ranks=shares if world.size > 1 else None,
                import_seconds=import_seconds)
        except MergeInputError as err:   # refused for its inputs: nothing to resume unless a shard is finished
            if isinstance(err, OutputWriteError) and writer is not None:
                writer.abort()   # a failed write: the journal keeps the statistics for --resume
            elif writer is not None:
                writer.discard()
            raise
        except BaseException:   # interrupted or failed: the partial stays for --resume
            if writer is not None:
                writer.abort()
            raise
        finally:
            inputs.close()

    def _agree(self, parts: dict, backend: str) -> None:
        """Refuse a distributed run whose ranks were not started with the same merge."""
        world = self.world
        world.phase = "checking that every rank runs the same merge"
        views = world.exchange({**parts, "version": __version__, "resume": self.resume, "force": self.force,
                                "backend": backend})
        what = {"config": "the config (method, parameters, models, options)",
                "inputs": "the input files (paths, sizes or modification times)",
                "layout": "the output's tensors or --max-shard-size", "version": "the lines_fast version",
                "resume": "--resume", "force": "--force", "backend": "the backend (--device)"}
        for rank, view in enumerate(views):
            differ = [text for key, text in what.items() if view[key] != views[0][key]]
            if differ:
                raise MergeInputError(
                    f"rank {rank} of {world.size} was started with another merge than rank 0: they differ in "
                    f"{', '.join(differ)}. Every rank must run the same command on the same files (on several "
                    "nodes: the inputs on one shared filesystem, at the same paths).")

    def _assign_shards(self, inputs: _Inputs, plan: _Plan, entries) -> tuple[list[int], set[str]]:
        """Each output shard's rank (byte-balanced over what reading it costs) and this rank's
        tensors. The shards are the writer's: plan_shards groups entries by group_by_size."""
        shards = [[entries[i][0] for i in group] for group in
                  group_by_size([dtype.itemsize * math.prod(shape) for _, dtype, shape in entries],
                                self.max_shard_size)]
        # A shard's cost: its tensors' bytes in every input (the rule `lines-fast plan` prices).
        tables = [c.tensors for c in inputs.all()]
        costs = [sum(info.nbytes for table in tables for info in map(table.get, names) if info is not None)
                 for names in shards]
        owners = assign_shards(costs, self.world.size)
        mine = {n for names, owner in zip(shards, owners) if owner == self.world.rank for n in names}
        if self.world.size > 1:
            load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(self.world.size)]
            self.log(f"{self.world.size} ranks share {len(shards)} shard(s): "
                     + ", ".join(f"rank {r} reads {human_bytes(b)} a pass" for r, b in enumerate(load)))
            if len(shards) < self.world.size:
                self.log(f"warning: only {len(shards)} shard(s) for {self.world.size} ranks, so some ranks idle; "
                         "a smaller --max-shard-size spreads the work (the layout then differs from a larger one's)")
        return owners, mine

    def _scales(self, plan: _Plan, stats: RunStats) -> dict[str, float]:
        """The factor on each tensor's merged task vector: λ, or LiNeS's λ(ℓ) that replaces it."""
        lines = self.spec.lines
        if lines is None:
            return {name: self._spec_for(name).lam for name in plan.merged}
        alpha = stats.alpha if lines.alpha == "auto" else float(lines.alpha)
        return lines_scales(plan.merged, alpha, lines.beta, lines.outside, lines.layer_pattern)

    def _packs(self, merged: list[str], inputs: _Inputs, plan: _Plan, stats: RunStats,
               scales: dict[str, float], segments: bool = False) -> list[list[str]]:
        """The merge pass's jobs as lists of tensors: one each, except runs of small tensors that
        an elementwise plan (ElementPlan.elementwise) merges packed end to end in one job, which
        gives the same bits at a fraction of the per-tensor cost. A pack holds tensors adjacent in
        the output (no copied tensor between them), with one plan, scale (LiNeS: one block), input
        and output dtypes, and statistics. segments: the backend takes packs of equal-sized tensors
        with a threshold each (MergeJob.segments), so TIES's tensor scope packs too."""
        position = {n: i for i, n in enumerate(plan.order)}
        # Looked up once, not per tensor: a checkpoint of 10^5 small tensors spends its time here.
        packable: dict[int, tuple[bool, bool]] = {}   # id(plan) -> (elementwise, segmented)
        tables = [c.tensors for c in ([inputs.base] if inputs.base else [])]
        model_tables = [m.tensors for m in inputs.models]
        base_table = inputs.base.tensors if inputs.base else None
        one_plan = None if self.config.per_tensor else self.plan
        no_stats = not stats.tensor_stats and stats.global_thresholds is None

        def key(name: str, numel: int):
            el = one_plan or self._plan_for(name)
            kinds = packable.get(id(el))
            if kinds is None:
                kinds = packable[id(el)] = (el.elementwise, segments and el.segment_packable)
            elementwise, segmented = kinds   # segmented: one threshold per tensor, equal sizes only
            if not (elementwise or segmented) or numel >= PACK_TENSOR_MAX or numel == 0:
                return None
            # The inputs' dtypes (torch.cat needs one per input): from the headers, not the data.
            if plan.substitutes:
                holders = [base_table if (i, name) in plan.substitutes else t for i, t in enumerate(model_tables)]
            else:
                holders = model_tables
            dtypes = tuple([t[name].dtype for t in tables] + [t[name].dtype for t in holders])
            # An elementwise plan's statistics are whole-model numbers, the same for every tensor.
            return (id(el), scales[name], plan.out_dtypes[name], dtypes,
                    None if no_stats else stats.for_tensor(name), numel if segmented else None)

        groups: list[list[str]] = []
        last_key, size, last_position = None, 0, -2
        shapes = plan.shapes
        for name in merged:
            numel = math.prod(shapes[name])
            k = key(name, numel)
            at = position[name]
            if k is not None and k == last_key and size + numel <= PACK_ELEMENTS and at == last_position + 1:
                groups[-1].append(name)
                size += numel
            else:
                groups.append([name])
                last_key, size = k, numel
            last_position = at
        return groups

    def _pack_job(self, group: list[str], inputs: _Inputs, plan: _Plan, stats: RunStats,
                  scales: dict[str, float]) -> MergeJob:
        """One job for tensors `group`: each input's tensors flattened end to end (a copy, small)."""
        name = group[0]

        def packed(ckpt) -> torch.Tensor:
            # Tensors stored back to back (the usual layout): one view of their bytes, no copy.
            span = ckpt.flat_span(group) if isinstance(ckpt, Checkpoint) else None
            return span if span is not None else torch.cat([ckpt.tensor(n).reshape(-1) for n in group])

        base = packed(inputs.base) if self.spec.uses_base and inputs.base is not None else None
        sources = ([inputs.base] if self.config.base_is_input else []) + list(inputs.models)
        if any((i, n) in plan.substitutes for i in range(len(inputs.models)) for n in group):
            models = [torch.cat([t.reshape(-1) for t in ts])
                      for ts in zip(*(self._model_tensors(inputs, plan, n) for n in group))]
        else:
            models = [packed(ckpt) for ckpt in sources]
        el = self._plan_for(name).at_scale(scales[name])
        numel = math.prod(plan.shapes[name])
        return MergeJob(f"{len(group)} tensors from {name}", base, models, stats.for_tensor(name), scales[name],
                        plan.out_dtypes[name].torch, plan=el, stream=False,
                        segments=(len(group), numel) if not el.elementwise else None,
                        segment_names=tuple(group) if not el.elementwise else ())

    def _merge_pass(self, passes, inputs, plan, backend, writer, pending, stats, scales) -> int:
        pending_set = set(pending)
        merged = [n for n in plan.merged if n in pending_set]
        total_in = self._input_bytes(inputs, merged)
        bar = Progress(f"pass {len(passes)}/{len(passes)} merge", total_in, enabled=self.progress,
                       tensors=len(merged))
        t0 = time.perf_counter()
        spec = self.spec
        source = inputs.base or inputs.models[0]
        stored = {n: s for n in merged if (s := self._stored_copy(inputs, plan, n, scales[n])) is not None}
        groups = self._packs([n for n in merged if n not in stored], inputs, plan, stats, scales,
                             getattr(backend, "packs_segments", False))

        def jobs() -> Iterator[MergeJob]:
            for k, group in enumerate(groups):
                # Backends take one job ahead of the one they work on, so this reads two ahead.
                self._prefetch(inputs, groups[k + 1][0] if k + 1 < len(groups) else None)
                if len(group) > 1:
                    yield self._pack_job(group, inputs, plan, stats, scales)
                    continue
                name = group[0]
                yield MergeJob(name, self._base_tensor(inputs, name) if spec.uses_base else None,
                               self._model_tensors(inputs, plan, name), stats.for_tensor(name), scales[name],
                               plan.out_dtypes[name].torch, plan=self._plan_for(name).at_scale(scales[name]),
                               stream=math.prod(plan.shapes[name]) >= STREAM_MIN,
                               release=self._releaser(inputs, name))

        # Written between the backend's outputs, in the plan's order: the tensors copied from the
        # reference (not float, excluded) and those whose output is an input's stored bytes.
        copies = [n for n in plan.order if (n in plan.copied or n in stored) and n in pending_set]
        position = {n: i for i, n in enumerate(plan.order)}
        next_copy = 0
        check = not self.config.allow_nonfinite

        def write_copies_before(limit: int) -> None:
            nonlocal next_copy
            while next_copy < len(copies) and position[copies[next_copy]] < limit:
                name = copies[next_copy]
                next_copy += 1
                ckpt, at = stored.get(name) or _stored_in(source, name)
                if type(ckpt) is Checkpoint:   # its bytes from the memory map, without torch
                    data = ckpt.raw_view(at)
                    if name in stored and check and not dtypes.all_finite(data, ckpt.tensors[at].dtype):
                        raise NonFiniteInput(name, 0)
                    writer.write_bytes(name, data)
                    data.release()
                else:
                    writer.write(name, ckpt.tensor(at))
                if name in stored:
                    self._release(inputs, name)
                    bar.advance(self._input_bytes(inputs, [name]), 1)
                else:
                    source.release(name)

        def write(name: str, output) -> None:
            for piece in [output] if isinstance(output, torch.Tensor) else output:
                if piece.dtype == torch.float16 and not self.config.allow_nonfinite:
                    self._refuse_overflow(name, piece)
                if piece is output:
                    writer.write(name, output)
                else:
                    writer.write_piece(name, piece)

        done = 0   # groups returned
        try:
            for job, output, _stats in backend.merge_many(jobs(), self.plan):
                group = groups[done]
                self.world.phase = f"merging tensor '{group[0]}'"
                write_copies_before(position[group[0]])
                if len(group) == 1:
                    write(group[0], output)
                else:   # a pack: its tensors end to end in output, written in one go
                    if (output.dtype == torch.float16 and not self.config.allow_nonfinite
                            and bool(torch.isinf(output).any())):
                        at = 0
                        for name in group:   # name the first tensor that overflows
                            n = math.prod(plan.shapes[name])
                            self._refuse_overflow(name, output[at:at + n])
                            at += n
                    writer.write_run(group, output)
                del output
                if len(group) == 1:
                    self._release(inputs, group[0])
                else:
                    for ckpt in inputs.all():
                        if isinstance(ckpt, Checkpoint):
                            ckpt.release_many(group)   # one madvise for a pack stored back to back
                        else:
                            for name in group:
                                if name in ckpt.tensors:
                                    ckpt.release(name)
                bar.advance(self._input_bytes(inputs, group), len(group))
                done += 1
            write_copies_before(len(plan.order))
        except NonFiniteInput as err:
            name = err.name
            if name not in plan.shapes:   # a pack's: jobs come back in order, so it follows the last returned
                failed = groups[min(done, len(groups) - 1)]
                name = next((n for n in failed if self._holds_nonfinite(inputs, plan, n)), failed[0])
            raise self._nonfinite(err, inputs, plan, name) from None
        bar.close()
        self.log(f"pass {len(passes)}/{len(passes)} (merge) took {time.perf_counter() - t0:.2f} s")
        return total_in

    def _holds_nonfinite(self, inputs: _Inputs, plan: _Plan, name: str) -> bool:
        tensors = [self._base_tensor(inputs, name) if self._reads_base else None,
                   *self._model_tensors(inputs, plan, name)]
        return any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors)

    def _refuse_overflow(self, name: str, output: torch.Tensor) -> None:
        """float16 holds at most 65504: a merged value beyond it would be stored as inf (the inputs
        were checked finite, so an inf here is an overflow of the cast)."""
        overflow = int(torch.isinf(output).sum())
        if overflow:
            raise MergeInputError(
                f"tensor '{name}': {overflow} merged value(s) are beyond float16's range (|x| > 65504), so the "
                "float16 output would store them as inf. Use --out-dtype bfloat16 or float32, lower the weights "
                "or lambda, or pass --allow-nonfinite to write the infinities anyway.")

    def _check_disk(self, out_bytes: int) -> None:
        parent = self.out_dir.resolve().parent
        while not parent.exists():
            parent = parent.parent
        partial = self.out_dir.with_name(self.out_dir.name + PARTIAL_SUFFIX)
        if self.resume and partial.is_dir():
            # Its shards are kept or deleted before anything new is written: only the rest needs room.
            out_bytes = max(0, out_bytes - sum(f.stat().st_size for f in partial.iterdir() if f.is_file()))
        free = shutil.disk_usage(parent).free
        needed = int(out_bytes * 1.02) + (64 << 20)
        if free < needed:
            raise MergeInputError(
                f"{parent}: too little free disk for the output: the merge writes {human_bytes(out_bytes)} and "
                f"needs {human_bytes(needed)} free (the output plus a margin of 2% and 64 MB for headers, the "
                f"index and the copied files), but {human_bytes(free)} are free. Free some space or choose "
                "another OUT_DIR.")

    def _tokenizer_files(self, inputs: _Inputs) -> list[Path]:
        """The output's tokenizer files: the tokenizer source's (the base's, or the first model's),
        rewritten for the built vocabulary and the chat template (lines_fast/tokenizer_files.py) in a
        scratch directory. Read before merging, so a bad path or template fails at the start."""
        config = self.config
        if config.tokenizer is not None and isinstance(config.tokenizer.source, Path):
            folder = config.tokenizer.source   # a model, or a folder holding only a tokenizer
            if not folder.is_dir():
                raise MergeInputError(f"{config.source}: tokenizer_source {folder} is not a directory; give the "
                                      "folder that holds the tokenizer files (tokenizer.json, ...).")
            files = aux_files_in(folder)
        else:
            files = (inputs.base or inputs.models[0]).aux_files()
            folder = (inputs.base or inputs.models[0]).path
        files = [f for f in files if f.name.startswith(tokenizer_files.TOKENIZER_PREFIXES)]
        template = None
        if config.chat_template is not None:
            template = tokenizer_files.chat_template(config.chat_template, [c.path for c in inputs.all()], config.source)
            if template is None:
                self.log("chat_template: auto: no model has a chat template; the output keeps its source's (none)")
            elif not files:
                raise MergeInputError(f"{config.source}: chat_template is given, but {folder} has no tokenizer files "
                                      "to write it into (mergekit would skip it with a warning). Give a "
                                      "tokenizer_source that has a tokenizer, or drop chat_template.")
        if inputs.vocabulary is None and template is None:
            return files   # copied as they are: no scratch directory (a killed merge would leave it behind)
        self._scratch = tempfile.TemporaryDirectory(prefix="lines-fast-tokenizer-")
        return tokenizer_files.output_files(files, inputs.vocabulary, template, Path(self._scratch.name), self.log)

    def _aux_files(self, inputs: _Inputs, plan: _Plan, scratch: Path, tok_files: list[Path]) -> list[Path]:
        """config.json etc. from the base (or first model); tokenizer files from _tokenizer_files."""
        source = inputs.base or inputs.models[0]
        names = {f.name for f in tok_files}
        files = [f for f in source.aux_files()
                 if f.name not in names and not f.name.startswith(tokenizer_files.TOKENIZER_PREFIXES)] + tok_files
        beside = source.path.parent / "config.json"
        if source.path.is_file() and not any(f.name == "config.json" for f in files) and beside.is_file():
            self.log(f"{source.label} is a lone .safetensors file, so the files beside it are not copied (they need "
                     f"not belong to it): the output has no config.json, which transformers needs to load it. Copy "
                     f"{beside} into the output if it is this model's, or give the model's folder instead.")
        updates = {}
        if self.config.out_dtype is not None:
            # The model's declared dtype should describe the merged weights: transformers 4 reads
            # torch_dtype, transformers 5 reads dtype.
            updates["torch_dtype"] = updates["dtype"] = self.config.out_dtype.name
        if inputs.layers is not None:
            updates["num_hidden_layers"] = inputs.layers   # slices: the output's own depth
        if inputs.vocabulary is not None:
            updates["vocab_size"] = inputs.vocabulary.rows   # the built vocabulary's (mergekit sets it too)
        patched = []
        for f in files:
            if f.name == "config.json" and updates:
                try:
                    cfg = json.loads(f.read_text())
                except (ValueError, OSError):
                    cfg = None
                if isinstance(cfg, dict):
                    if "num_hidden_layers" in updates and "num_hidden_layers" not in cfg:
                        self.log(f"{f}: no num_hidden_layers to set to the sliced output's {inputs.layers} "
                                 "layers; set this model type's layer-count key in the output's config.json")
                        del updates["num_hidden_layers"]
                    if "dtype" in updates and "dtype" not in cfg and "torch_dtype" not in cfg:
                        del updates["dtype"]
                    if "vocab_size" in updates and "vocab_size" not in cfg:
                        rows = updates.pop("vocab_size")
                        if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
                            cfg["text_config"]["vocab_size"] = rows
                    cfg.update(updates)
                    f = scratch / "config.json"
                    f.write_text(json.dumps(cfg, indent=2) + "\n")
            patched.append(f)
        return patched


def merge(config_or_path: Any, out_dir: str | os.PathLike, **options: Any) -> MergeResult:
    """Merge checkpoints as a config describes and write the result to out_dir.

    config_or_path: a MergeConfig, a dict in mergekit's YAML format, or a path to a YAML file.
    options: device, max_shard_size, force, resume, progress, log, and any MergeConfig field
    to override (lam, seed, trim_scope, lines, out_dtype, exclude, missing, allow_nonfinite...).
    """
    engine_keys = {"device", "max_shard_size", "force", "resume", "progress", "log"}
    engine_options = {k: v for k, v in options.items() if k in engine_keys}
    overrides = {k: v for k, v in options.items() if k not in engine_keys}
    config = load_config(config_or_path)
    if overrides:
        config = with_overrides(config, **overrides)
    return Engine(config, Path(out_dir), **engine_options).run()
