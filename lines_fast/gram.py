"""Per-group interpolation weights from norms and dot products (slerp, nuslerp, model_stock).

These methods merge with a plain weighted sum, sum_i c_i[g] x_i, whose weights depend on the
inputs: on the angle between two vectors (slerp, nuslerp) or the mean pairwise cosine of
the task vectors (model_stock), per GROUP of a tensor's elements. A backend finds them
before merging the tensor, in one read: the group's Gram matrix G[g, a, b] = sum_j x_a[j]
x_b[j] over the inputs x (float32 values, float64 products and sums: each product is
exact), then `weights(...)` turns it into float32 weights [M, groups]. The merge itself is
then the fused weighted sum every backend already runs.

Groups (Method.group_by) view the flat tensor as a [R, L] matrix, row-major:
    tensor    one group (R = numel, L = 1, groups are columns)
    leading   one group per index of dim 0 (reshape(shape[0], -1); no registered method uses it now)
    trailing  one group per vector along the last dim (norms over dim -1; a 1-D tensor is one group)
    columns   one group per vector along dim 0 (nuslerp_row_wise; a 1-D tensor is one group)
Element j of the flat tensor is in group j // L when groups are rows, j % L when columns.

The formulas follow mergekit 0.1.5's source (its eps and thresholds included) but run in
float64 on the Gram matrix, so they differ from mergekit's float32 steps by rounding only;
docs/methods.md states them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .lazy import torch

from .methods import Coefficients



@dataclass(frozen=True)
class GroupView:
    rows: int
    cols: int
    by_rows: bool        # groups are the rows (else the columns)

    @property
    def groups(self) -> int:
        return self.rows if self.by_rows else self.cols

    @property
    def group_len(self) -> int:
        """The divisor (rows) or modulus (columns) that maps a flat index to its group."""
        return self.cols


def group_view(shape, group_by: str) -> GroupView:
    numel = math.prod(shape)
    if numel == 0:
        return GroupView(0, 1, False)
    if group_by == "tensor" or len(shape) == 0:
        return GroupView(numel, 1, False)
    if group_by == "leading":
        return GroupView(shape[0], numel // shape[0], True)
    if group_by == "trailing":
        return GroupView(numel // shape[-1], shape[-1], True)
    if group_by == "columns":
        return GroupView(shape[0], numel // shape[0], False) if len(shape) > 1 else GroupView(numel, 1, False)
    raise ValueError(f"unknown group_by {group_by!r}")


def group_index(view: GroupView, start: int, stop: int, device=None) -> torch.Tensor:
    """The group of each flat element start..stop-1 (int64)."""
    idx = torch.arange(start, stop, dtype=torch.int64, device=device)
    return idx // view.group_len if view.by_rows else idx % view.group_len


def new_gram(view: GroupView, n_inputs: int, device=None) -> torch.Tensor:
    return torch.zeros(max(1, view.groups), n_inputs, n_inputs, dtype=torch.float64, device=device)


def add_gram(gram: torch.Tensor, xs: list[torch.Tensor], start: int, view: GroupView) -> None:
    """Add sum_j x_a[j] x_b[j] per group into gram[g, a, b] for flat chunks xs (float32, or the
    models' own dtype where x is the model itself; elements start.. of the tensor, any device).

    A chunk need not align with the rows: it is cut into a partial first row, whole rows and a
    partial last row, each a batched float64 product (no atomics), so the result depends only
    on the chunking, and then only in float64's last bits."""
    n = xs[0].numel()
    if n == 0:
        return
    # [M, n] float64, each row widened once as it is copied in (no float32 stack in between); xs
    # may be of any float dtype, since every float32 / bf16 / fp16 value is exact in float64.
    stacked = torch.empty((len(xs), n), dtype=torch.float64, device=xs[0].device)
    for row, x in zip(stacked, xs):
        row.copy_(x.reshape(-1))
    L = view.cols
    at, stop = start, start + n
    while at < stop:
        row, col = divmod(at, L)
        if col == 0 and stop - at >= L:
            rows, width = (stop - at) // L, L
        else:
            rows, width = 1, min(L - col, stop - at)
        block = stacked[:, at - start:at - start + rows * width].reshape(len(xs), rows, width)
        if view.by_rows:   # one Gram matrix per row
            gram[row:row + rows] += torch.einsum("arw,brw->rab", block, block)
        else:              # one per column: each pair's products summed down the columns (an einsum
            # to [width, a, b] runs as thousands of tiny matrix products: 24 s of a 26 s llama-336m merge)
            for a in range(len(xs)):
                for b in range(a, len(xs)):
                    sums = (block[a] * block[b]).sum(dim=0)
                    gram[col:col + width, a, b] += sums
                    if b != a:
                        gram[col:col + width, b, a] += sums
        at += rows * width


def _angle_weights(cos: torch.Tensor, t: float, linear: torch.Tensor) -> torch.Tensor:
    """(c_0, c_1) = (sin((1-t) a), sin(t a)) / sin a with a = acos(cos); (1-t, t) where `linear`."""
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(linear, torch.ones_like(cos), torch.sin(theta))
    c0 = torch.where(linear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(linear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return torch.stack([c0, c1])


def slerp_weights(gram: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit 0.1.5's slerp: norms below 1e-8 count as 1; cos = clamp(dot / (|a| |b|), -1, 1);
    |cos| > 0.9995 interpolates linearly."""
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    norms = torch.where(norms > 1e-8, norms, torch.ones_like(norms))
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    return _angle_weights(cos, t, cos.abs() > 0.9995)


def nuslerp_weights(gram: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's nuslerp: norms clamped below at 1e-7; (1 - cos^2) <= 1e-16 interpolates linearly."""
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1)).clamp(min=1e-7)
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    return _angle_weights(cos, t, (1 - cos * cos) <= 1e-16)


def model_stock_weights(gram: torch.Tensor) -> torch.Tensor:
    """mergekit's model_stock: cos = the mean over pairs a < b of clamp(dot / max(|a| |b|, 1e-6), -1, 1);
    t = N cos / (1 + (N - 1) cos), or 0 where |1 + (N - 1) cos| < 1e-6 (the base is kept there);
    every task vector gets weight t / N (theta = theta_0 + t * mean_i tau_i)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    cosines = [(gram[:, a, b] / (norms[:, a] * norms[:, b]).clamp(min=1e-6)).clamp(-1, 1)
               for a in range(n) for b in range(a + 1, n)]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    return (t / n).expand(n, -1)


FORMULAS = {
    Coefficients.SLERP: slerp_weights,
    Coefficients.NUSLERP: nuslerp_weights,
    Coefficients.MODEL_STOCK: lambda gram, t: model_stock_weights(gram),
}


def weights(kind: Coefficients, gram: torch.Tensor, t: float) -> torch.Tensor:
    """float32 CPU [M, groups] weights from a [groups, M, M] Gram matrix."""
    return FORMULAS[kind](gram.to("cpu", torch.float64), t).to(torch.float32).contiguous()
