"""The layer map for LiNeS: which residual block a tensor belongs to, and its scale.

A tensor is inside block l of a stack when its name contains a dotted component naming a
block list followed by the index, e.g. `model.layers.7.mlp.up_proj.weight` is block 7 of
stack `model.layers`. The stack is the name prefix before the index, so T5's encoder and
decoder, or CLIP's text and vision towers, are separate stacks, each with its own depth L
(max index + 1). Everything else (embeddings, positional/class embeddings, pre-/final
norms, heads) is outside every block. docs/methods.md, "LiNeS", is the contract:

    lambda(l) = alpha + beta * l / (L - 1)   inside block l of a stack of L blocks (L = 1: alpha)
    lambda    = alpha                        outside (option outside="last": alpha + beta)
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lines_fast.errors import MergeInputError
from lines_fast.spec import LINES_OUTSIDE

# Block-list component names of the supported families:
#   layers     Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-NeoX, HF CLIP/ViT encoders
#   h          GPT-2, GPT-J, Falcon, BLOOM
#   layer      BERT, RoBERTa
#   block      T5
#   resblocks  open_clip
#   blocks     timm ViT
# The component must be whole: preceded by the start of the name or '.', so `ghost.3.` or
# `fc_h.2.` never count as `h.N.`; the index must be followed by '.', so it is a component
# too. re.search returns the leftmost match, which is the rule: in T5's
# `encoder.block.3.layer.1.…` the block is 3, not the sub-layer 1. The alternatives cannot
# shadow each other (`layer` vs `layers`), since each must be followed by '.' and digits.
_BUILTIN = re.compile(r"(?:^|\.)(?:layers|h|layer|block|resblocks|blocks)\.([0-9]+)\.")

# Printed column widths stop growing here, so one very long name does not pad all 700+
# rows of a big model; longer cells just push the rest of their own row to the right.
_MAX_COLUMN_WIDTH = 64

# How each `outside` option scales tensors outside every block, as the summary words it.
_OUTSIDE_RULE = {"alpha": "alpha", "last": "alpha + beta"}


@dataclass(frozen=True)
class BlockRef:
    """Block `index` (from 0) of the stack whose tensors' names start with `stack`."""

    stack: str
    index: int


@dataclass(frozen=True)
class LayerRow:
    """One tensor of a layer table; stack/index/depth are None outside every block, and
    scale is None when the table was built without alpha and beta."""

    name: str
    stack: str | None
    index: int | None
    depth: int | None
    scale: float | None


@functools.lru_cache(maxsize=None)
def _compile_user_pattern(pattern: str) -> re.Pattern[str]:
    """Compile and validate a user layer_pattern once, however many names it is applied to."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise MergeInputError(
            f"LiNeS layer_pattern {pattern!r} is not a valid regular expression ({err}). "
            r"Give a regex with exactly one capturing group around the block index, "
            r"e.g. '\.(\d+)\.'."
        ) from None
    if compiled.groups != 1:
        raise MergeInputError(
            f"LiNeS layer_pattern {pattern!r} has {compiled.groups} capturing groups; it needs "
            r"exactly one, around the block index (use (?:...) for other groups), "
            r"e.g. 'blk_(\d+)\.'."
        )
    return compiled


def find_block(name: str, layer_pattern: str | None = None) -> BlockRef | None:
    """The block that tensor `name` is in, or None when it is outside every block.

    With `layer_pattern` (a regex with one capturing group for the index) the built-in
    rules are not used: the leftmost match's group is the index and the stack is the name
    before that group, minus a trailing '.'.
    """
    if layer_pattern is None:
        match = _BUILTIN.search(name)
        if match is None:
            return None
        # The built-in rule always has a '.' between the stack and the index.
        return BlockRef(name[: match.start(1) - 1], int(match.group(1)))

    match = _compile_user_pattern(layer_pattern).search(name)
    if match is None:
        return None
    digits = match.group(1)
    if digits is None or not re.fullmatch(r"[0-9]+", digits):
        raise MergeInputError(
            f"LiNeS layer_pattern {layer_pattern!r} matches tensor {name!r}, but its group "
            f"captured {digits!r}, not a block index. The group must match only digits, "
            r"e.g. '(\d+)'."
        )
    stack = name[: match.start(1)]
    return BlockRef(stack.removesuffix("."), int(digits))


def _depths(blocks: Iterable[BlockRef | None]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for block in blocks:
        if block is not None:
            depths[block.stack] = max(depths.get(block.stack, 0), block.index + 1)
    return depths


def stack_depths(names: Iterable[str], layer_pattern: str | None = None) -> dict[str, int]:
    """L per stack (max index + 1), in order of each stack's first tensor."""
    return _depths(find_block(name, layer_pattern) for name in names)


def lines_scale(
    block: BlockRef | None, depth: int, alpha: float, beta: float, outside: str = "alpha"
) -> float:
    """LiNeS scale of a tensor in `block` of a stack of `depth` blocks (depth unused outside)."""
    if outside not in LINES_OUTSIDE:
        raise MergeInputError(
            f"LiNeS outside={outside!r} is not one of {', '.join(LINES_OUTSIDE)}: 'alpha' gives "
            "tensors outside every block the scale alpha, 'last' gives them alpha + beta."
        )
    # float() so numpy/torch float32 scalars cannot pull the arithmetic out of double:
    # the reference and every backend must get the very same scale.
    alpha, beta = float(alpha), float(beta)
    if block is None:
        return alpha if outside == "alpha" else alpha + beta
    if not 0 <= block.index < depth:
        raise ValueError(f"block {block} is not inside a stack of depth {depth}")
    if depth == 1:
        return alpha
    return alpha + beta * block.index / (depth - 1)


def lines_scales(
    names: Iterable[str],
    alpha: float,
    beta: float,
    outside: str = "alpha",
    layer_pattern: str | None = None,
) -> dict[str, float]:
    """LiNeS scale per tensor name, with each stack's L taken from these names."""
    blocks = {name: find_block(name, layer_pattern) for name in names}
    depths = _depths(blocks.values())
    return {
        name: lines_scale(
            block, depths[block.stack] if block is not None else 1, alpha, beta, outside
        )
        for name, block in blocks.items()
    }


def layer_table(
    names: Iterable[str],
    alpha: float | None = None,
    beta: float | None = None,
    outside: str = "alpha",
    layer_pattern: str | None = None,
) -> list[LayerRow]:
    """One row per name, in input order; scales only when both alpha and beta are given."""
    if (alpha is None) != (beta is None):
        raise ValueError("layer_table needs both alpha and beta for scales, or neither")
    names = list(names)
    blocks = [find_block(name, layer_pattern) for name in names]
    depths = _depths(blocks)
    rows = []
    for name, block in zip(names, blocks):
        depth = depths[block.stack] if block is not None else None
        scale = None
        if alpha is not None:
            scale = lines_scale(block, depth or 1, alpha, beta, outside)
        rows.append(
            LayerRow(
                name=name,
                stack=block.stack if block is not None else None,
                index=block.index if block is not None else None,
                depth=depth,
                scale=scale,
            )
        )
    return rows


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_layer_table(rows: Iterable[LayerRow], outside: str | None = None) -> str:
    """Aligned text table (tensor | stack | block | L | scale) and a summary line.

    Tensors outside every block show "outside" as their stack; missing values show "-".

    `outside`, when given, names the rule the outside tensors' scale came from in the
    summary ("scale alpha" or "scale alpha + beta").
    """
    rows = list(rows)
    header = ("tensor", "stack", "block", "L", "scale")
    cells = [
        (
            row.name,
            row.stack if row.stack is not None else "outside",
            str(row.index) if row.index is not None else "-",
            str(row.depth) if row.depth is not None else "-",
            f"{row.scale:.6g}" if row.scale is not None else "-",
        )
        for row in rows
    ]
    widths = [
        min(_MAX_COLUMN_WIDTH, max(len(line[col]) for line in [header, *cells]))
        for col in range(len(header))
    ]
    # Text columns left-aligned, numbers right-aligned so their digits line up.
    aligns = ("<", "<", ">", ">", ">")

    def line(values: tuple[str, ...]) -> str:
        parts = [f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths)]
        return " | ".join(parts).rstrip()

    lines = [line(header), "-+-".join("-" * w for w in widths)]
    lines.extend(line(c) for c in cells)

    depths = {row.stack: row.depth for row in rows if row.stack is not None}
    stacks = ", ".join(f"{stack} (L={depth})" for stack, depth in depths.items())
    n_outside = sum(row.stack is None for row in rows)
    summary = f"{_plural(len(rows), 'tensor')}; {_plural(len(depths), 'stack')}"
    if depths:
        summary += f": {stacks}"
    summary += f"; {_plural(n_outside, 'tensor')} outside every block"
    if outside is not None:
        summary += f" (scale {_OUTSIDE_RULE[outside]})"
    lines.append(summary)
    return "\n".join(lines)


def depth_fractions(names: Iterable[str], layer_pattern: str | None = None) -> dict[str, float]:
    """mergekit's position of each tensor for per-layer parameter lists: l / (L - 1) in block l
    of a stack of L blocks (1 when L = 1, as mergekit's one-layer slice), 0 outside every block
    (mergekit evaluates embeddings, final norms and heads at t = 0)."""
    names = list(names)
    blocks = {name: find_block(name, layer_pattern) for name in names}
    depths = _depths(blocks.values())
    fractions = {}
    for name, block in blocks.items():
        if block is None:
            fractions[name] = 0.0
        else:
            depth = depths[block.stack]
            fractions[name] = block.index / (depth - 1) if depth > 1 else 1.0
    return fractions
