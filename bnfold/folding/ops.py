"""What the fold rules need to know about ATen ops: which ops are batch-norms, weight layers,
reshapes and value-preserving no-ops, and small queries on a graph node (its arguments, shape,
module path, and the users that read its values)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, fx

aten = torch.ops.aten

# Batch-norm ops: target -> (index of the "training" flag or None, index of eps, returns a tuple?).
# Every one takes (input, weight, bias, running_mean, running_var, ...).
BATCHNORM_OPS: dict[object, tuple[int | None, int, bool]] = {
    aten.batch_norm.default: (5, 7, False),
    aten._native_batch_norm_legit_no_training.default: (None, 6, True),
    aten._native_batch_norm_legit.default: (5, 7, True),
    aten.native_batch_norm.default: (5, 7, True),
    # (input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    # in eval mode with track_running_stats=True, a batch-norm in all but name.
    aten.instance_norm.default: (5, 7, False),
}
# Normalises with batch statistics and has no running statistics at all: (input, w, b, training, momentum, eps).
BATCH_STATS_OPS = {aten._native_batch_norm_legit.no_stats}

# Weight layers. Every one takes (input, weight, bias, ...).
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
CONV_PADDING_STR_OPS = {aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
GENERIC_CONV_OPS = {aten.convolution.default, aten._convolution.default}
LINEAR_OPS = {aten.linear.default}
WEIGHT_OPS = CONV_OPS | CONV_PADDING_STR_OPS | CONV_TRANSPOSE_OPS | GENERIC_CONV_OPS | LINEAR_OPS

# Ops that move a Linear's feature axis around without changing values.
VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}

# Ops that read only the shape of one argument (its index here): folding changes values, not shapes.
SHAPE_ONLY = {
    aten.reshape_as.default: 1,
    aten.view_as.default: 1,
    aten.expand_as.default: 1,
    aten.sym_size.int: 0,
    aten.zeros_like.default: 0,
    aten.ones_like.default: 0,
    aten.empty_like.default: 0,
}

# Value- and layout-preserving ops. Not clone/contiguous: they change strides a later view needs.
NO_OPS = {aten.alias.default, aten.detach.default}

AVG_POOLS = {aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default}
# Tensor sums, in place too (``out += branch(x)``): a summand's value is read once, by the sum.
ADDS = {aten.add.Tensor, aten.add_.Tensor}


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def op_name(node: fx.Node) -> str:
    """The op's short name (``relu_``, ``add``) for messages."""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def module_path(node: fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the innermost module that produced ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (not only its shape)."""
    return [
        user
        for user in node.users
        if not (
            user.target in SHAPE_ONLY
            and user.args[SHAPE_ONLY[user.target]] is node
            and sum(a is node for a in user.args) == 1
        )
    ]


def shape(node: fx.Node) -> tuple | None:
    """The shape recorded for ``node``'s tensor (symbolic sizes included), if any."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, Tensor) else None


def rank(node: fx.Node) -> int | None:
    """The number of dimensions of ``node``'s tensor, if recorded."""
    dims = shape(node)
    return None if dims is None else len(dims)


def channels_of(node: fx.Node) -> int | None:
    """Size of dim 1 of ``node``'s tensor, when recorded and static."""
    dims = shape(node)
    return int(dims[1]) if dims is not None and len(dims) > 1 and isinstance(dims[1], int) else None


def feature_axis_through(linear: fx.Node, chain: list[fx.Node]) -> int | None:
    """Where a Linear's feature (last) axis ends up after ``chain`` of reshape/permute ops, or
    None when a reshape merges or splits it."""
    dims = shape(linear)
    if dims is None:
        return None
    axis = len(dims) - 1
    for node in chain:
        out = shape(node)
        if out is None:
            return None
        if node.target is aten.permute.default:
            axis = [int(d) % len(out) for d in node.args[1]].index(axis % len(out))
        elif node.target is aten.transpose.int:
            d0, d1 = (int(d) % len(out) for d in node.args[1:3])
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        else:  # view/reshape/flatten: the axis survives where its block of values does
            axis = _axis_through_reshape(shape(node.args[0]), out, axis)
            if axis is None:
                return None
    return axis


def _axis_through_reshape(before: tuple, after: tuple, axis: int) -> int | None:
    """Where axis ``axis`` of a row-major tensor of shape ``before`` is after a reshape to
    ``after``: the output axis of the same size with as many values after it (the same stride),
    so that unit axes may come and go around it; None when the reshape splits or merges it."""
    trailing = before[axis + 1 :]
    if not all(isinstance(d, int) for d in (before[axis], *trailing)):
        return None
    for index, size in enumerate(after):
        rest = after[index + 1 :]
        static = isinstance(size, int) and all(isinstance(d, int) for d in rest)
        if static and size == before[axis] and math.prod(rest) == math.prod(trailing):
            return index
    return None


def _alias_arguments(user: fx.Node, node: fx.Node) -> list[bool]:
    """For each argument of ``user`` that is ``node`` and that ``user``'s schema marks as aliased
    (a view or an in-place write): whether it is written."""
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return []
    found = []
    for index, argument in enumerate(schema.arguments):
        value = user.args[index] if index < len(user.args) else user.kwargs.get(argument.name)
        if value is node and argument.alias_info is not None:
            found.append(bool(argument.alias_info.is_write))
    return found


def mutated(node: fx.Node) -> bool:
    """Whether an op writes to ``node``'s tensor in place (``relu_``, ``add_``, ``zero_``),
    directly or through a view or an in-place result of it."""
    for user in node.users:
        aliases = _alias_arguments(user, node)
        if any(aliases) or (aliases and mutated(user)):
            return True
    return False


def fetch_attribute(gm: fx.GraphModule, target: str) -> Tensor:
    """The tensor a ``get_attr`` target names."""
    return functools.reduce(getattr, target.split("."), gm)
