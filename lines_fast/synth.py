"""Synthetic checkpoint families (a base model and fine-tunes of it) in Hugging Face layout.

Used by `lines-fast demo`, the tests, the benchmarks and `lines-fast plan`. A *recipe* is a
Llama shape (hidden size, layers, heads, ...); from it we derive the exact tensor names and
shapes of `LlamaForCausalLM` and can write a base model plus N fine-tunes whose task vectors
look like real ones:

- base weights ~ N(0, base_std); RMSNorm weights ~ 1 + N(0, base_std);
- each fine-tune is base + delta, with delta ~ N(0, delta_std * depth_factor): deeper layers
  move more (the factor grows linearly from 0.5 at layer 0 to 1.5 at the last layer; the
  embedding counts as shallowest, the final norm and lm_head as deepest), since fine-tuning
  changes deep layers more than shallow ones -- the effect LiNeS is built on;
- about `zero_fraction` of the delta elements are exactly zero, and the fine-tuned value is
  computed as dtype(float32(stored base) + delta), so a zero delta reproduces the stored base
  bit for bit and, in bf16, many small deltas round away or repeat the same magnitude, as in
  real bf16 fine-tunes.

Memory: nothing ever holds a whole model. Tensors are generated in fixed-size pieces and
streamed straight into the .safetensors files through lines_fast.writer.ShardedWriter
(write_piece), which plans every shard's header up front from the shapes. Writing all models
of the family in lockstep lets each fine-tune reuse the base piece just generated instead of
regenerating it. The writers run with durable=False: synthetic data can be regenerated, so
it is not fsynced. Peak memory is a few tens of MB whatever the recipe, which is what makes a
`layers=K` cut of Llama-3-70B (a 2.1 GB embedding in bf16) writable on a small machine.

Determinism: every piece is drawn from its own torch.Generator seeded from (seed, model
index, tensor name, piece index), and piece boundaries depend only on the tensor's shape.
So the same arguments give byte-identical files, independent of threading, and a `layers=K`
cut has the same base tensors as the full model under the same names.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import MergeInputError
from .writer import ShardedWriter, made_by_lines_fast

__all__ = [
    "Recipe",
    "RECIPES",
    "FamilyPaths",
    "recipe",
    "tensor_shapes",
    "param_count",
    "checkpoint_bytes",
    "hf_config",
    "write_checkpoint_family",
    "write_yaml_config",
    "generate",
    "INT_TENSOR_NAME",
]


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """The shape of a Llama-architecture model (what config.json says, minus the data)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    # config.json details only; they do not change any tensor shape.
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # A few hundred KB in bf16: fast enough for every test.
        Recipe("tiny", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=128),
        # The benchmark shape of FACTS.md (mergekit measured on it): TinyLlama widths, 4 layers, MHA.
        Recipe("llama-336m", hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=16, vocab=32000),
        # TinyLlama-1.1B.
        Recipe("llama-1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
        # Llama-3-70B exactly. Too big to write whole here: plan with its shapes, or cut it with
        # recipe("llama3-70b", layers=K) to write its first K layers at full width.
        Recipe(
            "llama3-70b", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256,
            max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
        ),
    )
}


def recipe(name: str | Recipe, layers: int | None = None) -> Recipe:
    """The named recipe, optionally cut to its first `layers` layers (names and widths unchanged)."""
    if isinstance(name, Recipe):
        base = name
    else:
        try:
            base = RECIPES[name]
        except KeyError:
            raise MergeInputError(
                f"Unknown synthetic model recipe {name!r}. Known recipes: {', '.join(RECIPES)}."
            ) from None
    if layers is None or layers == base.layers:
        return base
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= base.layers:
        raise MergeInputError(
            f"Recipe {base.name!r} has {base.layers} layers; a cut must keep between 1 and "
            f"{base.layers} of them, not {layers!r}."
        )
    return replace(base, name=f"{base.name}-{layers}L", layers=layers)


# --------------------------------------------------------------------------- shapes

INT_TENSOR_NAME = "model.position_ids"
INT_TENSOR_SHAPE = (1, 16)
_INT_VALUE = torch.arange(INT_TENSOR_SHAPE[1], dtype=torch.int64).reshape(INT_TENSOR_SHAPE)

# Tensor kinds: how a tensor's values are generated.
_WEIGHT, _NORM, _INT = "weight", "norm", "int"


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str
    depth: float  # in [0, 1]: 0 for the embedding and layer 0, 1 for the last layer and the head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensor_specs(r: Recipe, int_tensor: bool = False) -> list[_TensorSpec]:
    """Every tensor of LlamaForCausalLM in HF order: embed, layers in order, norm, lm_head."""
    h, kv = r.hidden, r.kv_heads * r.head_dim
    specs = [_TensorSpec("model.embed_tokens.weight", (r.vocab, h), _WEIGHT, 0.0)]
    for i in range(r.layers):
        depth = i / (r.layers - 1) if r.layers > 1 else 0.0
        p = f"model.layers.{i}."
        for suffix, shape, kind in (
            ("input_layernorm.weight", (h,), _NORM),
            ("self_attn.q_proj.weight", (h, h), _WEIGHT),
            ("self_attn.k_proj.weight", (kv, h), _WEIGHT),
            ("self_attn.v_proj.weight", (kv, h), _WEIGHT),
            ("self_attn.o_proj.weight", (h, h), _WEIGHT),
            ("post_attention_layernorm.weight", (h,), _NORM),
            ("mlp.gate_proj.weight", (r.intermediate, h), _WEIGHT),
            ("mlp.up_proj.weight", (r.intermediate, h), _WEIGHT),
            ("mlp.down_proj.weight", (h, r.intermediate), _WEIGHT),
        ):
            specs.append(_TensorSpec(p + suffix, shape, kind, depth))
    specs.append(_TensorSpec("model.norm.weight", (h,), _NORM, 1.0))
    if not r.tie_embeddings:
        specs.append(_TensorSpec("lm_head.weight", (r.vocab, h), _WEIGHT, 1.0))
    if int_tensor:
        specs.append(_TensorSpec(INT_TENSOR_NAME, INT_TENSOR_SHAPE, _INT, 0.0))
    return specs


def tensor_shapes(r: Recipe, int_tensor: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in HF order; needs no data (fine for Llama-3-70B)."""
    return [(s.name, s.shape) for s in _tensor_specs(r, int_tensor)]


def param_count(r: Recipe) -> int:
    """Number of parameters (floating-point elements) of the model."""
    return sum(s.numel for s in _tensor_specs(r))


_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_HF_DTYPE_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _HF_DTYPE_NAME:
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise MergeInputError(
        f"Unsupported checkpoint dtype {dtype!r}: use bfloat16, float16 or float32."
    )


def checkpoint_bytes(r: Recipe, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of tensor data of one model (index.json's total_size), without writing anything."""
    return param_count(r) * _as_dtype(dtype).itemsize


def hf_config(r: Recipe, dtype: torch.dtype | str = torch.bfloat16) -> dict:
    """A plausible config.json of LlamaForCausalLM for the recipe."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": r.bos_token_id,
        "eos_token_id": r.eos_token_id,
        "head_dim": r.head_dim,
        "hidden_act": "silu",
        "hidden_size": r.hidden,
        "initializer_range": 0.02,
        "intermediate_size": r.intermediate,
        "max_position_embeddings": r.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": r.heads,
        "num_hidden_layers": r.layers,
        "num_key_value_heads": r.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": r.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": r.rope_theta,
        "tie_word_embeddings": r.tie_embeddings,
        "torch_dtype": _HF_DTYPE_NAME[_as_dtype(dtype)],
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": r.vocab,
    }


def _tensor_dtype(spec: _TensorSpec, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if spec.kind == _INT else dtype


# --------------------------------------------------------------------------- generation

# Elements per generated piece: big enough that per-piece Python overhead is negligible, small
# enough that the scratch buffers (a few per piece, reused) stay well under glibc's mmap
# threshold and out of the page-fault path, and that peak memory stays tens of MB.
_PIECE_ELEMS = 1 << 21
_WORKERS = 2  # torch's RNG is single-threaded per call: run independent pieces side by side


def _seed_for(seed: int, model: int, name: str, piece: int) -> int:
    """A 63-bit generator seed that depends on every input (so pieces are independent streams)."""
    digest = hashlib.blake2b(f"{seed}/{model}/{name}/{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _pieces(spec: _TensorSpec) -> Iterator[tuple[int, int]]:
    """(start, stop) flat element ranges of at most _PIECE_ELEMS each: depend on the size only.
    A tensor without elements gets one empty piece, which the writer needs to move past it."""
    for start in range(0, max(spec.numel, 1), _PIECE_ELEMS):
        yield start, min(start + _PIECE_ELEMS, spec.numel)


@dataclass(frozen=True)
class _GenParams:
    seed: int
    n_finetunes: int
    dtype: torch.dtype
    base_std: float
    delta_std: float
    norm_delta_scale: float
    zero_count: int  # a delta element is zeroed with probability zero_count / 2**16


class _Slot:
    """Reusable buffers for one piece in flight (one slot per concurrent piece)."""

    def __init__(self, n_models: int, dtype: torch.dtype):
        self.base32 = torch.empty(_PIECE_ELEMS)
        self.delta = torch.empty(_PIECE_ELEMS)
        self.bits = torch.empty((_PIECE_ELEMS + 3) // 4, dtype=torch.int64)
        self.mask = torch.empty(_PIECE_ELEMS, dtype=torch.bool)
        self.out = [torch.empty(_PIECE_ELEMS, dtype=dtype) for _ in range(n_models)]


def _delta_std(spec: _TensorSpec, p: _GenParams) -> float:
    std = p.delta_std * (0.5 + spec.depth)  # linear in depth: 0.5x at the bottom, 1.5x at the top
    # Norm weights sit near 1.0, where a bf16 step is 2**-7 (~4x delta_std at the top layer):
    # without a larger delta nearly every norm change would round away in bf16.
    return std * p.norm_delta_scale if spec.kind == _NORM else std


def _generate_piece(slot: _Slot, spec: _TensorSpec, piece: int, n: int, p: _GenParams) -> list[torch.Tensor]:
    """Fill slot.out[m][:n] with piece `piece` of the tensor for model m (0 = base); return views."""
    if spec.kind == _INT:  # a buffer every model shares, as a merge should pass it through
        return [_INT_VALUE] * (p.n_finetunes + 1)
    g = torch.Generator()
    base32 = slot.base32[:n]
    g.manual_seed(_seed_for(p.seed, 0, spec.name, piece))
    if spec.kind == _NORM:
        base32.normal_(1.0, p.base_std, generator=g)
    else:
        base32.normal_(0.0, p.base_std, generator=g)
    outs = [slot.out[0][:n].copy_(base32)]
    # Fine-tunes start from the *stored* base, so a zero delta reproduces it exactly.
    base32.copy_(outs[0])
    std = _delta_std(spec, p)
    delta, mask = slot.delta[:n], slot.mask[:n]
    for m in range(1, p.n_finetunes + 1):
        g.manual_seed(_seed_for(p.seed, m, spec.name, piece))
        delta.normal_(0.0, std, generator=g)
        if p.zero_count == 1 << 16:
            delta.zero_()
        elif p.zero_count > 0:
            # 16 uniform bits per element, 4 per int64 draw: ~4x cheaper than torch.rand. A
            # uniform int16 is below zero_count - 2**15 with probability exactly zero_count / 2**16.
            bits = slot.bits[: (n + 3) // 4].random_(-(1 << 63), None, generator=g)
            torch.lt(bits.view(torch.int16)[:n], p.zero_count - (1 << 15), out=mask)
            delta.masked_fill_(mask, 0.0)
        delta.add_(base32)
        outs.append(slot.out[m][:n].copy_(delta))  # the cast to dtype is the quantization
    return outs


@dataclass
class FamilyPaths:
    """Where write_checkpoint_family put the models: one HF directory each."""

    base: Path
    finetunes: list[Path]

    @property
    def models(self) -> list[Path]:
        """Base first, then the fine-tunes."""
        return [self.base, *self.finetunes]


def _side_files(r: Recipe, dtype: torch.dtype) -> dict[str, str]:
    """The non-weight files of every model directory: file name -> text."""
    files = {
        "config.json": hf_config(r, dtype),
        "generation_config.json": {
            "_from_model_config": True,
            "bos_token_id": r.bos_token_id,
            "eos_token_id": r.eos_token_id,
            "transformers_version": "4.44.0",
        },
        # Enough for tools that copy or inspect the tokenizer; there is no vocabulary file.
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": r.max_position_embeddings,
            "tokenizer_class": "LlamaTokenizer",
            "clean_up_tokenization_spaces": False,
        },
    }
    return {name: json.dumps(obj, indent=2, sort_keys=True) + "\n" for name, obj in files.items()}


def write_checkpoint_family(
    out_dir: str | Path,
    recipe: Recipe,
    n_finetunes: int = 3,
    dtype: torch.dtype | str = torch.bfloat16,
    seed: int = 0,
    max_shard_size: int | None = None,
    zero_fraction: float = 0.3,
    int_tensor: bool = False,
    *,
    base_std: float = 0.02,
    delta_std: float = 1e-3,
    norm_delta_scale: float = 10.0,
) -> FamilyPaths:
    """Write out_dir/base and out_dir/ft1..ftN as HF checkpoint directories.

    delta_std is the mean (over depth) standard deviation of a fine-tune's delta on weight
    matrices: 5% of base_std by default, 0.5x that at layer 0 and 1.5x at the last layer.
    max_shard_size (bytes) shards the weights into model-0000i-of-0000N.safetensors with a
    model.safetensors.index.json; without it each model is one model.safetensors.
    int_tensor adds an int64 buffer (model.position_ids, [1, 16]) identical in every model.
    An existing model directory is replaced as a whole (deleted first: synthetic data needs
    no old copy to fall back on), and the fine-tunes of an earlier, larger family there
    (ftN+1, ...: synthetic models lines_fast wrote) are removed, so out_dir holds one family.
    """
    dtype = _as_dtype(dtype)
    if isinstance(n_finetunes, bool) or not isinstance(n_finetunes, int) or n_finetunes < 0:
        raise MergeInputError(f"n_finetunes must be a non-negative integer, not {n_finetunes!r}.")
    if max_shard_size is not None and max_shard_size <= 0:
        raise MergeInputError(f"max_shard_size must be a positive number of bytes, not {max_shard_size!r}.")
    if not 0.0 <= zero_fraction <= 1.0:
        raise MergeInputError(f"zero_fraction must be in [0, 1], not {zero_fraction!r}.")
    params = _GenParams(
        seed=seed, n_finetunes=n_finetunes, dtype=dtype, base_std=base_std, delta_std=delta_std,
        norm_delta_scale=norm_delta_scale, zero_count=round(zero_fraction * (1 << 16)),
    )

    out_dir = Path(out_dir)
    paths = FamilyPaths(out_dir / "base", [out_dir / f"ft{i}" for i in range(1, n_finetunes + 1)])
    specs = _tensor_specs(recipe, int_tensor)
    entries = [(s.name, _tensor_dtype(s, dtype), s.shape) for s in specs]
    for d in paths.models:   # all checked before anything is deleted
        if (d.exists() or d.is_symlink()) and not made_by_lines_fast(d):
            raise MergeInputError(
                f"'{d}' exists and is not a model lines_fast wrote, so generating there would delete it; "
                "lines_fast never deletes what it did not write. Choose another OUT_DIR.")
    writers: list[ShardedWriter] = []
    try:
        for d in paths.models:
            # Delete an old model now rather than at publication (as overwrite=True alone would):
            # its gigabytes of not yet written-back page cache would otherwise compete with the
            # new model's (llama-336m + 3 fine-tunes: 8.0 s instead of 4.9 s here).
            if d.exists():
                shutil.rmtree(d)
            writers.append(ShardedWriter(
                d, entries, max_shard_size=max_shard_size or sys.maxsize, metadata={"lines_fast_synthetic": recipe.name},
                overwrite=True, durable=False,
            ))
        # Pieces flow through a window of 2 * _WORKERS slots: while the main thread writes the
        # oldest finished piece, the pool generates the next ones, so disk writes overlap
        # generation. A slot is handed out again only after the piece it held has been written.
        slots = [_Slot(n_finetunes + 1, dtype) for _ in range(2 * _WORKERS)]
        items = [(spec, piece, stop - start) for spec in specs for piece, (start, stop) in enumerate(_pieces(spec))]
        inflight: deque = deque()

        def write_oldest() -> None:
            name, fut = inflight.popleft()
            for w, t in zip(writers, fut.result()):
                w.write_piece(name, t)

        with ThreadPoolExecutor(_WORKERS) as pool:
            for i, (spec, piece, n) in enumerate(items):
                if len(inflight) == len(slots):
                    write_oldest()
                fut = pool.submit(_generate_piece, slots[i % len(slots)], spec, piece, n, params)
                inflight.append((spec.name, fut))
            while inflight:
                write_oldest()
        side = _side_files(recipe, dtype)
        for w in writers:
            w.finish(extra_files=side)
        stale = out_dir / f"ft{n_finetunes + 1}"
        while _synthetic(stale):
            shutil.rmtree(stale)
            stale = out_dir / f"ft{int(stale.name[2:]) + 1}"
    except BaseException:
        # Synthetic data is never resumed: leave no partial directories behind.
        for w in writers:
            w.abort()
            shutil.rmtree(w.partial, ignore_errors=True)
        raise
    return paths


def _synthetic(folder: Path) -> bool:
    """Whether `folder` is a synthetic model lines_fast generated (lines_fast_synthetic metadata)."""
    from .checkpoint import read_header

    if not made_by_lines_fast(folder):
        return False
    weights = sorted(folder.glob("*.safetensors"))
    try:
        return bool(weights) and "lines_fast_synthetic" in read_header(weights[0])[1]
    except MergeInputError:
        return False


# --------------------------------------------------------------------------- merge configs

def _per_model(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise MergeInputError(f"Got {len(values)} {what} values for {n} fine-tuned models.")
    return values


def check_request(n_finetunes: int, yaml_method: str | None) -> None:
    """Refuse, before any file is written, a family generate could not write or whose config
    would not run."""
    if n_finetunes < 1:
        raise MergeInputError(f"{n_finetunes} fine-tuned models: generate at least 1 (--models N, default 3).")
    if yaml_method is not None:
        _config_models(yaml_method, n_finetunes)


def _config_models(method: str, n: int) -> tuple[bool, int]:
    """(whether the config lists the base among its models, how many of n fine-tunes it merges);
    a MergeInputError if the method is unknown or needs more than n."""
    from . import methods

    definition = methods.get(method)
    with_base = definition.inputs is methods.Inputs.BASE_AND_MODELS   # slerp: the base is a model
    needed = definition.min_models - with_base
    if n < needed:
        raise MergeInputError(f"{method} merges {definition.models_text()} model(s): its config needs at least "
                              f"{needed} fine-tune(s) (--models {needed}), not {n}.")
    return with_base, n if definition.max_models is None else min(n, definition.max_models - with_base)


def write_yaml_config(
    path: str | Path,
    family: FamilyPaths,
    method: str = "ties",
    density: float | Sequence[float] = 0.2,
    weight: float | Sequence[float] = 1.0,
    lam: float | None = None,
    normalize: bool | None = None,
    dtype: str = "float32",
    out_dtype: str = "bfloat16",
    extra: dict | None = None,
) -> Path:
    """Write a mergekit-format YAML merging the family's fine-tunes into its base, one that
    `lines-fast merge` runs as written, whatever the method (the registry says how):

    - as many fine-tunes as the method merges (the first ones; slerp: the base and ft1, as
      mergekit's slerp configs list them), and an error naming the count if there are too few;
    - each value only where the method takes it: a density to each model of a sparsifying
      method, lambda and normalize only when given (None: the method's default), a required
      parameter (slerp's t) at the middle of its range.

    Paths are absolute, so the YAML works from any directory. `extra` adds or overrides
    top-level keys.
    """
    from . import methods

    definition = methods.get(method)
    n = len(family.finetunes)
    given = {"weight": _per_model(weight, n, "weight"), "density": _per_model(density, n, "density")}
    with_base, used = _config_models(method, n)
    chosen = family.finetunes[:used]
    models = [{"model": str(family.base.resolve())}] if with_base else []
    for i, ft in enumerate(chosen):
        mp = {p.name: given[p.name][i] for p in definition.model_params() if p.name in given}
        models.append({"model": str(ft.resolve()), **({"parameters": mp} if mp else {})})
    parameters = {"lambda": None if lam is None else float(lam), "normalize": normalize,
                  **{p.name: (p.low + p.high) / 2 for p in definition.shared_params() if p.required}}
    config: dict = {
        "merge_method": method,
        "base_model": str(family.base.resolve()),
        "models": models,
        "parameters": {k: v for k, v in parameters.items() if v is not None and definition.takes(k)},
        "dtype": dtype,
        "out_dtype": out_dtype,
    }
    if definition.inputs is methods.Inputs.MODELS:
        del config["base_model"]  # a soup of the fine-tunes (mergekit would average a base_model in)
    config.update(extra or {})

    import yaml  # imported here so the rest of the module works without pyyaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def generate(
    recipe_name: str | Recipe,
    out_dir: str | Path,
    n_finetunes: int = 3,
    dtype: torch.dtype | str = "bfloat16",
    layers: int | None = None,
    seed: int = 0,
    max_shard_size: int | None = None,
    zero_fraction: float = 0.3,
    int_tensor: bool = False,
    yaml_method: str | None = None,
    **yaml_options,
) -> FamilyPaths:
    """Scripts' one-call entry: resolve the recipe, write the family, and optionally a merge
    YAML for `yaml_method` at out_dir/<method>.yaml (yaml_options go to write_yaml_config)."""
    r = recipe(recipe_name, layers)
    check_request(n_finetunes, yaml_method)
    family = write_checkpoint_family(
        out_dir, r, n_finetunes=n_finetunes, dtype=dtype, seed=seed,
        max_shard_size=max_shard_size, zero_fraction=zero_fraction, int_tensor=int_tensor,
    )
    if yaml_method is not None:
        yaml_options.setdefault("out_dtype", _dtype_name(dtype))
        write_yaml_config(Path(out_dir) / f"{yaml_method}.yaml", family, method=yaml_method, **yaml_options)
    return family


def _dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16': a generated config's out_dtype is the family's."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
