"""Ops a per-channel affine map ``s·x + t`` moves through unchanged, so it can fold into a weight
layer a few ops away.

An op ``P`` that computes each output value of channel ``c`` as a weighted sum of input values of
the same channel, with weights summing to 1, commutes: ``P(s·x + t) = s·P(x) + t``. That covers
average pooling (``count_include_pad=False``, or no padding), adaptive average pooling, a mean
over spatial axes, and nearest/linear/cubic up- and down-sampling. Max pooling commutes only
where every ``s > 0`` (a negative scale turns a max into a min). Flattening ``[N, C, ...]`` to
``[N, C·k]`` keeps the map, repeating each channel's ``s, t`` over its ``k`` features.

Each of these ops acts on the *last* axes of its input: a ``k``-d pool or resampling reaches the
channel axis (dim 1) unless its input has exactly ``k + 2`` dims (``avg_pool1d`` on ``[N, C]``
pools over the channels), and a mean commutes only when it leaves dims 0 and 1 alone, whatever
the form of its ``dim`` argument (``None``, negative, repeated) and in its own dtype.
"""

from __future__ import annotations

import math
import re

from torch import Tensor, fx

from .ops import AVG_POOLS, arg, aten, rank, shape

_ADAPTIVEAVG_POOLS = {
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
}
_MAX_POOLS = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default}
_RESAMPLES = {
    aten.upsample_nearest1d.vec,
    aten.upsample_nearest2d.vec,
    aten.upsample_nearest3d.vec,
    aten.upsample_linear1d.vec,
    aten.upsample_bilinear2d.vec,
    aten.upsample_trilinear3d.vec,
    aten.upsample_bicubic2d.vec,
}
CHANNEL_PRESERVING = AVG_POOLS | _ADAPTIVEAVG_POOLS | _MAX_POOLS | _RESAMPLES | {aten.mean.dim}
# How many trailing (spatial) axes each pool or resampling op acts on: the k of its "...kd" name.
_SPATIAL_AXES = {op: int(re.search(r"(\d)d$", op._opname).group(1)) for op in CHANNEL_PRESERVING - {aten.mean.dim}}
_FLATTENS = {aten.flatten.using_ints, aten.view.default, aten.reshape.default}


def _avg_pool_problem(node: fx.Node, t: Tensor) -> str | None:
    padded = any(int(p) for p in (arg(node, 3, "padding", 0) or [0]))
    counts_pad = arg(node, 5, "count_include_pad", True)
    exact_divisor = not arg(node, 4, "ceil_mode", False) and arg(node, 6, "divisor_override") is None
    if ((padded and counts_pad) or not exact_divisor) and bool((t != 0).any()):
        return "an average pool that counts padding (or divides by another size) would spread the shift unevenly"
    return None


def _mean_problem(node: fx.Node) -> str | None:
    dims = rank(node.args[0])
    axes = arg(node, 1, "dim")
    if dims is None:
        return f"'{node.name}' averages a tensor of unknown rank"
    reduced = range(dims) if axes is None or len(axes) == 0 else {int(a) % dims for a in axes}
    if 0 in reduced or 1 in reduced:
        return f"'{node.name}' averages over the batch or channel axis, which mixes the channels"
    if arg(node, 3, "dtype") is not None:
        return f"'{node.name}' averages in another dtype"
    return None


def commute_problem(node: fx.Node, s: Tensor, t: Tensor) -> str | None:
    """Why ``s·x + t`` does not pass through ``node`` (a channel-preserving op), if it does not."""
    if node.target is aten.mean.dim:
        return _mean_problem(node)
    if node.target not in _SPATIAL_AXES:  # a flatten: see flatten_factor
        return None
    spatial, dims = _SPATIAL_AXES[node.target], rank(node.args[0])
    if dims != spatial + 2:
        return f"'{node.name}' acts on the last {spatial} axes of a {dims}-D tensor, which include the channel axis"
    if node.target in AVG_POOLS:
        return _avg_pool_problem(node, t)
    if node.target in _MAX_POOLS and not bool((s > 0).all()):
        return f"'{node.name}' is a max pool and the scale is not positive in every channel"
    return None


def flatten_factor(node: fx.Node) -> int | None:
    """``k`` when ``node`` flattens ``[N, C, ...]`` into ``[N, C·k]`` (channel ``c`` becomes
    features ``c·k .. c·k + k − 1``), else None."""
    if node.target not in _FLATTENS:
        return None
    before, after = shape(node.args[0]), shape(node)
    if before is None or after is None or len(before) < 2 or len(after) != 2:
        return None
    rest = before[2:]
    if not all(isinstance(d, int) for d in (*rest, before[1], after[1])):
        return None
    k = math.prod(rest)
    return k if after[1] == before[1] * k else None
