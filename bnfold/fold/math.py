"""Pure tensor functions for batch-norm folding. Everything here computes in float64.

A batch-norm in eval mode is the per-channel affine map ``bn(x) = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - s * running_mean``.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Return the float64 per-channel ``(s, t)`` of an eval-mode batch-norm.

    ``weight``/``bias`` are gamma/beta; ``None`` (``affine=False``) means 1 and 0.
    """
    mean = running_mean.detach().to(F64)
    var = running_var.detach().to(F64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(F64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(F64)
    s = gamma / torch.sqrt(var + eps)
    return s, beta - s * mean


def scale_output_channels(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold ``s * y + t`` into a layer whose output channel is weight dim 0.

    Covers Conv1d/2d/3d (any groups, stride, dilation, padding) and Linear:
    ``W'[o] = s[o] * W[o]`` and ``b' = s * b + t`` (``b = 0`` when absent).
    """
    w = weight.detach().to(F64)
    b = torch.zeros(w.shape[0], dtype=F64) if bias is None else bias.detach().to(F64)
    view = (-1,) + (1,) * (w.dim() - 1)
    return w * s.reshape(view), s * b + t


def scale_transposed_output_channels(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Fold ``s * y + t`` into a ConvTranspose{1,2,3}d.

    Its weight is ``[Cin, Cout/groups, k...]``: output channel ``o`` lives in group
    ``o // (Cout/groups)`` at column ``o % (Cout/groups)`` of dim 1.
    """
    w = weight.detach().to(F64)
    cin, cout_per_group = w.shape[0], w.shape[1]
    cout = cout_per_group * groups
    b = torch.zeros(cout, dtype=F64) if bias is None else bias.detach().to(F64)
    kernel = w.shape[2:]
    grouped = w.reshape(groups, cin // groups, cout_per_group, *kernel)
    scale = s.reshape(groups, 1, cout_per_group, *([1] * len(kernel)))
    return (grouped * scale).reshape(w.shape), s * b + t
