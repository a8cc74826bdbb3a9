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


def scale_output_channels(weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``s * y + t`` into a layer whose output channel is weight dim 0.

    Covers Conv1d/2d/3d (any groups, stride, dilation, padding) and Linear:
    ``W'[o] = s[o] * W[o]`` and ``b' = s * b + t`` (``b = 0`` when absent).
    """
    w = weight.detach().to(F64)
    b = torch.zeros(w.shape[0], dtype=F64, device=w.device) if bias is None else bias.detach().to(F64)
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
    b = torch.zeros(cout, dtype=F64, device=w.device) if bias is None else bias.detach().to(F64)
    kernel = w.shape[2:]
    grouped = w.reshape(groups, cin // groups, cout_per_group, *kernel)
    scale = s.reshape(groups, 1, cout_per_group, *([1] * len(kernel)))
    return (grouped * scale).reshape(w.shape), s * b + t


def scale_input_channels(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold a preceding ``s * x + t`` into a Conv{1,2,3}d or Linear (input channel = weight dim 1).

    ``W'[o, i] = W[o, i] * s[c]`` and ``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c]`` with
    ``c = group(o) * Cin/groups + i``. Exact when the layer sees no zero padding, or ``t == 0``.
    """
    w = weight.detach().to(F64)
    cout, cin_per_group = w.shape[0], w.shape[1]
    b = torch.zeros(cout, dtype=F64, device=w.device) if bias is None else bias.detach().to(F64)
    grouped = w.reshape(groups, cout // groups, cin_per_group, -1)
    scaled = grouped * s.reshape(groups, 1, cin_per_group, 1)
    shift = (grouped * t.reshape(groups, 1, cin_per_group, 1)).sum(dim=(2, 3)).reshape(cout)
    return scaled.reshape(w.shape), b + shift


def scale_transposed_input_channels(weight: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Fold a preceding ``s * x`` (zero shift) into a ConvTranspose{1,2,3}d: weight is
    ``[Cin, Cout/groups, k...]``, so input channel ``i`` is row ``i``. The bias is unchanged."""
    w = weight.detach().to(F64)
    b = None if bias is None else bias.detach().to(F64)
    return w * s.reshape((-1,) + (1,) * (w.dim() - 1)), b


def compose_affine(s1: Tensor, t1: Tensor, s2: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """``s2 * (s1 * x + t1) + t2`` as one ``s * x + t``."""
    return s2 * s1, s2 * t1 + t2


def batchnorm_params_for(s: Tensor, t: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gamma, beta and running mean that make a batch-norm with ``running_var`` and ``eps``
    compute ``s * x + t`` (the running mean becomes 0)."""
    gamma = s * torch.sqrt(running_var.detach().to(F64) + eps)
    return gamma, t.clone(), torch.zeros_like(t)


def pad_kernel(weight: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """Zero-pad a conv weight's spatial dims, centred, to ``kernel`` (e.g. a 1x1 to a 3x3)."""
    w = weight.detach().to(F64)
    pads: list[int] = []
    for have, want in zip(reversed(w.shape[2:]), reversed(kernel)):
        pads += [(want - have) // 2, (want - have) // 2]
    return torch.nn.functional.pad(w, pads)


def channel_kernel(scale: Tensor, cin_per_group: int, kernel: tuple[int, ...], values: Tensor | None = None) -> Tensor:
    """A conv weight ``[C, Cin/groups, *kernel]`` mapping channel ``o`` to itself: the centre tap is
    ``scale[o]`` (an identity or a per-channel affine), or, with ``values`` (a kernel-shaped
    tensor), every tap is ``scale[o] * values`` (e.g. an average pool's ``1/k^d``)."""
    channels = scale.numel()
    w = torch.zeros(channels, cin_per_group, *kernel, dtype=F64)
    local = torch.arange(channels) % cin_per_group
    if values is None:
        centre = tuple(k // 2 for k in kernel)
        w[(torch.arange(channels), local, *centre)] = scale.to(F64)
    else:
        w[torch.arange(channels), local] = scale.to(F64).reshape(-1, *([1] * len(kernel))) * values.to(F64)
    return w
