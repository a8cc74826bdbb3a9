"""The fold pass: find batch-norms on a captured ATen graph, fold each into a neighbouring weight
layer (or batch-norm) where that is exact, and report every one of them."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..errors import FoldError
from ..report import FOLDED, KEPT, BatchNormEntry, FoldReport
from . import math as fold_math

aten = torch.ops.aten
# Node meta key: index in the FoldReport of the entry of a batch-norm that stayed in the graph.
ENTRY_META = "bnfold_entry"

# Batch-norm ops: target -> (index of the "training" flag or None, index of eps, returns a tuple?).
# Every one takes (input, weight, bias, running_mean, running_var, ...).
_BATCHNORM_OPS: dict[object, tuple[int | None, int, bool]] = {
    aten.batch_norm.default: (5, 7, False),
    aten._native_batch_norm_legit_no_training.default: (None, 6, True),
    aten._native_batch_norm_legit.default: (5, 7, True),
    aten.native_batch_norm.default: (5, 7, True),
}
# Normalises with batch statistics and has no running statistics at all: (input, w, b, training, momentum, eps).
_BATCH_STATS_OPS = {aten._native_batch_norm_legit.no_stats}

# Weight layers. Every one takes (input, weight, bias, ...).
_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_CONV_PADDING_STR_OPS = {aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_GENERIC_CONV_OPS = {aten.convolution.default, aten._convolution.default}
_LINEAR_OPS = {aten.linear.default}
_WEIGHT_OPS = _CONV_OPS | _CONV_PADDING_STR_OPS | _CONV_TRANSPOSE_OPS | _GENERIC_CONV_OPS | _LINEAR_OPS
# Padding modes that commute with a per-channel affine map (the padded values are input values).
_AFFINE_COMMUTING_PAD_MODES = {"reflect", "replicate", "circular"}


def fetch_attribute(gm: fx.GraphModule, target: str) -> Tensor:
    """The tensor a ``get_attr`` target names."""
    return functools.reduce(getattr, target.split("."), gm)


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _module_path(node: fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the innermost module that produced ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _is_stored(node: object) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


@dataclass
class _BatchNormSite:
    """One batch-norm call in the graph; its tensors are read live, since folds rewire them."""

    node: fx.Node
    output: fx.Node
    """The node carrying the normalised tensor (the op itself, or its ``getitem(0)``)."""
    eps: float
    uses_batch_stats: bool
    name: str
    kind: str
    num_channels: int = 0

    @property
    def source(self) -> fx.Node:
        return self.node.args[0]

    @property
    def weight(self) -> fx.Node | None:
        return self.node.args[1]

    @property
    def bias(self) -> fx.Node | None:
        return self.node.args[2]

    @property
    def mean(self) -> fx.Node | None:
        return None if self.node.target in _BATCH_STATS_OPS else self.node.args[3]

    @property
    def var(self) -> fx.Node | None:
        return None if self.node.target in _BATCH_STATS_OPS else self.node.args[4]

    def channels(self, gm: fx.GraphModule) -> int:
        for ref in (self.mean, self.weight):
            if isinstance(ref, fx.Node) and ref.op == "get_attr":
                return int(fetch_attribute(gm, ref.target).numel())
        val = self.source.meta.get("val") if isinstance(self.source, fx.Node) else None
        return int(val.shape[1]) if val is not None and val.dim() > 1 else 0

    def scale_shift(self, gm: fx.GraphModule) -> tuple[Tensor, Tensor]:
        get = lambda ref: None if ref is None else fetch_attribute(gm, ref.target)
        return fold_math.bn_scale_shift(get(self.mean), get(self.var), get(self.weight), get(self.bias), self.eps)


@dataclass
class _WeightLayer:
    node: fx.Node
    transposed: bool
    groups: int
    kind: str
    name: str

    @property
    def weight(self) -> fx.Node:
        return self.node.args[1]

    @property
    def bias(self) -> fx.Node | None:
        return _arg(self.node, 2, "bias")

    def zero_pads_input(self) -> bool:
        """Whether the layer itself pads its input with zeros (a transposed conv's padding crops
        its output instead)."""
        if self.kind == "Linear" or self.transposed:
            return False
        padding = _arg(self.node, 4, "padding", 0)
        if isinstance(padding, str):
            kernel = self.weight.meta["val"].shape[2:] if "val" in self.weight.meta else ()
            return padding == "same" and any(k > 1 for k in kernel)
        return any(int(p) != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))


def _batchnorm_site(node: fx.Node) -> _BatchNormSite | None:
    if node.op != "call_function":
        return None
    if node.target in _BATCH_STATS_OPS:
        training_idx, eps_idx, returns_tuple, has_stats = None, 5, True, False
    elif node.target in _BATCHNORM_OPS:
        (training_idx, eps_idx, returns_tuple), has_stats = _BATCHNORM_OPS[node.target], True
    else:
        return None
    output = node
    if returns_tuple:
        # Only the normalised tensor (item 0) may be used for the batch-norm to be foldable.
        items = [u for u in node.users if u.target is operator.getitem]
        firsts = [u for u in items if u.args[1] == 0]
        output = firsts[0] if len(firsts) == 1 and len(items) == len(node.users) == 1 else node
    training = bool(node.args[training_idx]) if training_idx is not None else False
    mean = node.args[3] if has_stats else None
    uses_batch_stats = not has_stats or training or mean is None or node.args[4] is None
    located = _module_path(node)
    if located and "BatchNorm" in located[1]:
        name, kind = located
    elif isinstance(mean, fx.Node) and mean.op == "get_attr":
        name, kind = mean.target.rsplit(".", 1)[0], "batch_norm"
    else:
        name, kind = node.name, "batch_norm"
    return _BatchNormSite(node, output, float(node.args[eps_idx]), uses_batch_stats, name or node.name, kind)


def _weight_layer(node: fx.Node) -> _WeightLayer | None:
    if node.op != "call_function" or node.target not in _WEIGHT_OPS:
        return None
    weight = node.args[1]
    if node.target in _GENERIC_CONV_OPS:
        transposed, groups = bool(node.args[6]), int(node.args[8])
    elif node.target in _LINEAR_OPS:
        transposed, groups = False, 1
    else:
        transposed = node.target in _CONV_TRANSPOSE_OPS
        groups = int(_arg(node, 6, "groups", 1))
    if node.target in _LINEAR_OPS:
        kind = "Linear"
    else:
        dims = weight.meta["val"].dim() if isinstance(weight, fx.Node) and "val" in weight.meta else None
        kind = ("ConvTranspose" if transposed else "Conv") + (f"{dims - 2}d" if dims else "")
    located = _module_path(node)
    if located and located[0]:
        name = located[0]
    elif isinstance(weight, fx.Node) and weight.op == "get_attr":
        name = weight.target.rsplit(".", 1)[0]
    else:
        name = node.name
    return _WeightLayer(node, transposed, groups, kind, name)


_VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.transpose.int,
}


# Ops that read only the shape of one argument (its index here): folding changes values, not shapes.
_SHAPE_ONLY = {
    aten.reshape_as.default: 1,
    aten.view_as.default: 1,
    aten.expand_as.default: 1,
    aten.sym_size.int: 0,
    aten.zeros_like.default: 0,
    aten.ones_like.default: 0,
    aten.empty_like.default: 0,
}


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (not only its shape)."""
    return [
        user
        for user in node.users
        if not (
            user.target in _SHAPE_ONLY
            and user.args[_SHAPE_ONLY[user.target]] is node
            and sum(a is node for a in user.args) == 1
        )
    ]


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, Tensor) else None


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, Tensor) else None


def _channels_of(node: fx.Node) -> int | None:
    shape = _shape(node)
    return int(shape[1]) if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None


def _feature_axis_through(linear: fx.Node, chain: list[fx.Node]) -> int | None:
    """Where a Linear's feature (last) axis ends up after ``chain`` of reshape/permute ops, or
    None when a reshape merges or splits it."""
    shape = _shape(linear)
    if shape is None:
        return None
    axis, features = len(shape) - 1, shape[-1]
    for node in chain:
        out = _shape(node)
        if out is None:
            return None
        if node.target is aten.permute.default:
            axis = list(node.args[1]).index(axis if axis >= 0 else axis + len(out))
        elif node.target is aten.transpose.int:
            d0, d1 = (int(d) % len(out) for d in node.args[1:3])
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        else:  # view/reshape/flatten keep the axis only as the unchanged last dimension
            if axis != len(_shape(node.args[0])) - 1 or out[-1] != features:
                return None
            axis = len(out) - 1
    return axis


def _category(site: _BatchNormSite) -> str:
    """A short reason class, without layer names, for grouping kept batch-norms in the report."""
    if site.uses_batch_stats:
        return "uses batch statistics at inference"
    source = site.source
    if source.op == "placeholder":
        return "on a model input"
    if source.target is aten.cat.default:
        return "after Concat of shared features" if len(source.users) > 1 else "after Concat"
    layer = _weight_layer(source)
    if layer is not None:
        if len(_value_users(layer.node)) > 1:
            return f"after a {layer.kind.rstrip('123d')} whose output is also used elsewhere"
        return f"after a {layer.kind.rstrip('123d')} it cannot fold into"
    if _batchnorm_site(source) is not None or source.target is operator.getitem:
        return "after another kept batch-norm"
    return f"after {_op_name(source)}"


def _describe_source(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "it normalises a model input"
    if node.op == "call_function":
        if _batchnorm_site(node) is not None or node.target is operator.getitem:
            return "its input is another batch-norm that stays"
        return f"its input comes from '{_op_name(node)}', not directly from a conv/linear layer"
    return f"its input comes from {node.op} '{node.target}', not a conv/linear layer"


def _check_statistics(gm: fx.GraphModule, site: _BatchNormSite) -> None:
    for label, ref in (
        ("running_mean", site.mean),
        ("running_var", site.var),
        ("weight", site.weight),
        ("bias", site.bias),
    ):
        if not (isinstance(ref, fx.Node) and ref.op == "get_attr"):
            continue
        value = fetch_attribute(gm, ref.target).detach()
        bad = ~torch.isfinite(value)
        if bad.any():
            raise FoldError(
                f"batch-norm '{site.name}' has {int(bad.sum())} NaN/inf value(s) in its {label}: "
                "the checkpoint is corrupt or training diverged; re-train or recalibrate it."
            )
        if label == "running_var" and (value < 0).any():
            raise FoldError(
                f"batch-norm '{site.name}' has {int((value < 0).sum())} negative running_var "
                f"value(s) (min {float(value.min()):.3g}): a variance cannot be negative; "
                "the checkpoint is corrupt."
            )


def _cast_checked(value: Tensor, like: Tensor, what: str) -> Tensor:
    cast = value.to(like.dtype)
    if not torch.isfinite(cast).all():
        big = float(value.abs().max())
        raise FoldError(
            f"{what} does not fit {like.dtype} (largest magnitude {big:.3g}): the batch-norm has a "
            "tiny running_var with a large weight; fix the statistics or export in a wider dtype."
        )
    return cast


class _FoldPass:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.counter = 0

    # ------------------------------------------------------------------------- graph edits
    def _new_attr(self, value: Tensor, before: fx.Node, suffix: str) -> fx.Node:
        name = f"_bnfold_{self.counter}_{suffix}"
        while hasattr(self.gm, name):  # another pass over the same graph made this one
            self.counter += 1
            name = f"_bnfold_{self.counter}_{suffix}"
        self.counter += 1
        self.gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def _set_weights(self, layer: _WeightLayer, weight: Tensor, bias: Tensor | None) -> None:
        args = list(layer.node.args)
        args[1] = self._new_attr(weight, layer.node, "weight")
        if bias is None:
            layer.node.args = tuple(args)
            return
        b_node = self._new_attr(bias, layer.node, "bias")
        if len(args) > 2:
            args[2] = b_node
            layer.node.args = tuple(args)
        else:
            layer.node.args = tuple(args)
            layer.node.kwargs = {**layer.node.kwargs, "bias": b_node}

    def _remove(self, site: _BatchNormSite, replacement: fx.Node) -> None:
        site.output.replace_all_uses_with(replacement)
        for node in dict.fromkeys((site.output, site.node)):
            self.gm.graph.erase_node(node)

    def _layer_tensors(self, layer: _WeightLayer) -> tuple[Tensor, Tensor | None]:
        return fetch_attribute(self.gm, layer.weight.target), None if layer.bias is None else fetch_attribute(
            self.gm, layer.bias.target
        )

    def _cast_pair(
        self,
        site: _BatchNormSite,
        layer: _WeightLayer,
        w: Tensor,
        b: Tensor | None,
        like_w: Tensor,
        like_b: Tensor | None,
    ):
        what = f"folding batch-norm '{site.name}' into {layer.kind} '{layer.name}'"
        w = _cast_checked(w, like_w, f"{what}: the weight")
        b = None if b is None else _cast_checked(b, like_w if like_b is None else like_b, f"{what}: the bias")
        return w, b

    def _folded(self, site: _BatchNormSite, into: str, pattern: str, shared: bool = False) -> BatchNormEntry:
        if shared:
            pattern += "; weights copied, other call sites keep the originals"
        return BatchNormEntry(site.name, site.kind, site.num_channels, FOLDED, into=into, pattern=pattern)

    def keep(self, site: _BatchNormSite, reason: str) -> BatchNormEntry:
        return BatchNormEntry(site.name, site.kind, site.num_channels, KEPT, reason=reason, category=_category(site))

    # ------------------------------------------------------------------------------ visit
    def visit(self, site: _BatchNormSite) -> BatchNormEntry:
        site.num_channels = site.channels(self.gm)
        if site.uses_batch_stats:
            if site.mean is not None and site.var is not None:
                return self.keep(site, "called with training=True: it normalises with batch statistics at inference")
            return self.keep(site, "track_running_stats=False: it normalises with batch statistics at inference")
        if site.output is site.node and site.node.target is not aten.batch_norm.default:
            return self.keep(site, "its saved mean/invstd outputs are used elsewhere")
        if not all(_is_stored(r) for r in (site.weight, site.bias, site.mean, site.var)):
            return self.keep(site, "its parameters are computed at run time, not stored")
        entry_or_reason = self._fold_into_producer(site)
        if isinstance(entry_or_reason, BatchNormEntry):
            return entry_or_reason
        consumer = self._fold_into_consumer(site)
        if isinstance(consumer, BatchNormEntry):
            return consumer
        return self.keep(site, f"{entry_or_reason}; {consumer}")

    # ----------------------------------------------------------------- output side: X -> BN
    def _fold_into_producer(self, site: _BatchNormSite) -> BatchNormEntry | str:
        source = site.source
        if isinstance(source, fx.Node) and source.target is aten.cat.default:
            return self._fold_into_concat(site, source)
        if isinstance(source, fx.Node) and source.target in _VIEW_OPS:
            return self._fold_through_reshape(site, source)
        layer = _weight_layer(source)
        if layer is None:
            return _describe_source(source)
        problem = self._output_fold_problem(layer, site.num_channels)
        if layer.kind == "Linear" and problem is None and _rank(layer.node) != 2:
            problem = (
                f"Linear '{layer.name}' output is {_rank(layer.node)}-D: BatchNorm1d normalises dim 1 "
                "but Linear acts on the last dim, so folding would be wrong"
            )
        if problem:
            return problem
        s, t = site.scale_shift(self.gm)
        shared = self._apply_output_fold(site, layer, s, t)
        self._remove(site, layer.node)
        return self._folded(site, layer.name, f"{layer.kind} → {site.kind}", shared)

    def _output_fold_problem(self, layer: _WeightLayer, channels: int) -> str | None:
        """Why the output of ``layer`` cannot absorb a ``channels``-wide affine map, if it cannot."""
        if len(_value_users(layer.node)) > 1:
            others = len(_value_users(layer.node)) - 1
            return f"the output of {layer.kind} '{layer.name}' is also used by {others} other op(s)"
        if not (_is_stored(layer.weight) and layer.weight is not None and _is_stored(layer.bias)):
            return f"the weight of {layer.kind} '{layer.name}' is computed at run time, not stored"
        weight = fetch_attribute(self.gm, layer.weight.target)
        out_channels = weight.shape[1] * layer.groups if layer.transposed else weight.shape[0]
        if out_channels != channels:
            return (
                f"channel mismatch: {layer.kind} '{layer.name}' has {out_channels} outputs, the batch-norm {channels}"
            )
        return None

    def _apply_output_fold(self, site: _BatchNormSite, layer: _WeightLayer, s: Tensor, t: Tensor) -> bool:
        """Scale ``layer``'s output channels by ``s`` and shift them by ``t``; returns whether
        the layer's weights were shared with other call sites (and so were copied)."""
        weight, bias = self._layer_tensors(layer)
        if layer.transposed:
            new_w, new_b = fold_math.scale_transposed_output_channels(weight, bias, s, t, layer.groups)
        else:
            new_w, new_b = fold_math.scale_output_channels(weight, bias, s, t)
        new_w, new_b = self._cast_pair(site, layer, new_w, new_b, weight, bias)
        shared = len(layer.weight.users) > 1  # the layer is called at other sites too
        self._set_weights(layer, new_w, new_b)
        return shared

    def _fold_into_concat(self, site: _BatchNormSite, cat: fx.Node) -> BatchNormEntry | str:
        """Split -> convs -> Concat -> BN (MixNet): each conv takes its slice of the batch-norm."""
        parts = list(cat.args[0])
        dim = int(_arg(cat, 1, "dim", 0))
        rank = _rank(cat)
        if len(cat.users) > 1:
            return f"it normalises a Concat whose result {len(cat.users) - 1} other op(s) also read"
        if rank is None or dim % rank != 1:
            return "it normalises a Concat that is not along the channel axis"
        layers = [_weight_layer(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(layer is None for layer in layers) or len(set(parts)) != len(parts):
            return "it normalises a Concat whose inputs are not all distinct conv/linear outputs"
        widths = [_channels_of(p) for p in parts]
        if None in widths or sum(widths) != site.num_channels:
            return "channel mismatch between the Concat inputs and the batch-norm"
        problems = [self._output_fold_problem(layer, w) for layer, w in zip(layers, widths)]
        if any(problems):
            return f"it normalises a Concat and {next(p for p in problems if p)}"
        if any(layer.kind == "Linear" and _rank(layer.node) != 2 for layer in layers):
            return "it normalises a Concat of Linear outputs that are not 2-D"
        s, t = site.scale_shift(self.gm)
        offset, shared = 0, False
        for layer, width in zip(layers, widths):
            shared |= self._apply_output_fold(site, layer, s[offset : offset + width], t[offset : offset + width])
            offset += width
        self._remove(site, cat)
        names = ", ".join(layer.name for layer in layers)
        return self._folded(site, names, f"{len(layers)} convs → Concat → {site.kind}, one slice each", shared)

    def _fold_through_reshape(self, site: _BatchNormSite, node: fx.Node) -> BatchNormEntry | str:
        """Linear -> Reshape/Flatten/Permute -> BatchNorm1d (LeViT): foldable when the reshapes
        carry the Linear's feature axis to the batch-norm's channel axis (dim 1)."""
        chain = [node]
        while chain[-1].args and isinstance(chain[-1].args[0], fx.Node) and chain[-1].args[0].target in _VIEW_OPS:
            chain.append(chain[-1].args[0])
        source = chain[-1].args[0]
        layer = _weight_layer(source) if isinstance(source, fx.Node) else None
        if layer is None or layer.kind != "Linear":
            return f"its input comes from '{_op_name(node)}', not directly from a conv/linear layer"
        if any(len(_value_users(n)) > 1 for n in chain):
            return "the reshaped Linear output is also used elsewhere"
        axis = _feature_axis_through(layer.node, list(reversed(chain)))
        if axis != 1:
            return (
                f"the reshape between Linear '{layer.name}' and the batch-norm does not put the Linear's "
                "features on the batch-norm's channel axis, so folding would be wrong"
            )
        problem = self._output_fold_problem(layer, site.num_channels)
        if problem:
            return problem
        s, t = site.scale_shift(self.gm)
        shared = self._apply_output_fold(site, layer, s, t)
        self._remove(site, node)
        return self._folded(site, layer.name, f"Linear → {_op_name(node)} → {site.kind}", shared)

    # ------------------------------------------------------------------ input side: BN -> X
    def _fold_into_consumer(self, site: _BatchNormSite) -> BatchNormEntry | str:
        users = list(site.output.users)
        if len(users) != 1:
            return f"its output feeds {len(users)} ops"
        consumer = users[0]
        pad = None
        if consumer.op == "call_function" and consumer.target is aten.pad.default and len(consumer.users) == 1:
            mode = _arg(consumer, 2, "mode", "constant")
            if mode in _AFFINE_COMMUTING_PAD_MODES:
                pad, consumer = consumer, next(iter(consumer.users))
        next_bn = _batchnorm_site(consumer) if pad is None else None
        if next_bn is not None and next_bn.source is site.output:
            return self._compose(site, next_bn)
        layer = _weight_layer(consumer)
        feeds = pad if pad is not None else site.output
        if layer is None or layer.node.args[0] is not feeds:
            return f"its output feeds '{_op_name(consumer)}', not a conv/linear layer"
        if not (_is_stored(layer.weight) and layer.weight is not None and _is_stored(layer.bias)):
            return f"the weight of the following {layer.kind} '{layer.name}' is computed at run time"
        weight, bias = self._layer_tensors(layer)
        in_channels = weight.shape[0] if layer.transposed else weight.shape[1] * layer.groups
        if in_channels != site.channels(self.gm):
            return f"channel mismatch: the following {layer.kind} '{layer.name}' takes {in_channels} channels"
        src_val = site.source.meta.get("val")
        if layer.kind == "Linear" and src_val is not None and src_val.dim() != 2:
            return f"it normalises dim 1 of a {src_val.dim()}-D tensor but the following Linear '{layer.name}' acts on the last dim"
        s, t = site.scale_shift(self.gm)
        zero_shift = bool((t == 0).all())
        if layer.zero_pads_input() and not zero_shift:
            return (
                f"the following {layer.kind} '{layer.name}' zero-pads its input and the batch-norm's "
                "shift is non-zero, so folding would change the borders"
            )
        if layer.transposed and not zero_shift:
            return f"the following {layer.kind} '{layer.name}' would spread a non-zero shift unevenly over its output"
        if layer.transposed:
            new_w, new_b = fold_math.scale_transposed_input_channels(weight, bias, s)
        else:
            new_w, new_b = fold_math.scale_input_channels(weight, bias, s, t, layer.groups)
        new_w, new_b = self._cast_pair(site, layer, new_w, new_b, weight, bias)
        shared = len(layer.weight.users) > 1  # the layer is called at other sites too
        self._set_weights(layer, new_w, new_b)
        self._remove(site, site.source)
        pattern = f"{site.kind} → {layer.kind}, input side" + (
            f", through {_arg(pad, 2, 'mode')} padding" if pad else ""
        )
        return self._folded(site, layer.name, pattern, shared)

    def _compose(self, site: _BatchNormSite, next_bn: _BatchNormSite) -> BatchNormEntry | str:
        if next_bn.uses_batch_stats or not all(
            _is_stored(r) for r in (next_bn.weight, next_bn.bias, next_bn.mean, next_bn.var)
        ):
            return "the following batch-norm uses batch statistics or computed parameters"
        if next_bn.channels(self.gm) != site.channels(self.gm):
            return "channel mismatch with the following batch-norm"
        s1, t1 = site.scale_shift(self.gm)
        s2, t2 = next_bn.scale_shift(self.gm)
        s, t = fold_math.compose_affine(s1, t1, s2, t2)
        var = fetch_attribute(self.gm, next_bn.var.target)
        gamma, beta, mean = fold_math.batchnorm_params_for(s, t, var, next_bn.eps)
        what = f"composing batch-norm '{site.name}' with '{next_bn.name}'"
        args = list(next_bn.node.args)
        for index, value, suffix in ((1, gamma, "weight"), (2, beta, "bias"), (3, mean, "running_mean")):
            args[index] = self._new_attr(_cast_checked(value, var, what), next_bn.node, suffix)
        next_bn.node.args = tuple(args)
        self._remove(site, site.source)
        return self._folded(site, next_bn.name, f"{site.kind} → {next_bn.kind}, composed")

    def remove_unused_attributes(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name in [
            n
            for n, _ in [*self.gm.named_parameters(), *self.gm.named_buffers()]
            if n.startswith("_bnfold_") and n not in used
        ]:
            delattr(self.gm, name)


def describe_attribute_use(gm: fx.GraphModule, node: fx.Node) -> str:
    """Name what a stored tensor is, for errors: "the weight of Conv2d 'layer1.conv'" and the like."""
    for user in node.users:
        layer = _weight_layer(user)
        if layer is not None:
            role = "weight" if user.args[1] is node else "bias"
            return f"the {role} of {layer.kind} '{layer.name}'"
        site = _batchnorm_site(user)
        if site is not None:
            role = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}.get(
                list(user.args).index(node), "tensor"
            )
            return f"the {role} of batch-norm '{site.name}'"
    return f"tensor '{node.target}'"


# Value- and layout-preserving ops. Not clone/contiguous: they change strides a later view needs.
_NO_OPS = {aten.alias.default, aten.detach.default}


def _drop_no_ops(gm: fx.GraphModule) -> None:
    """Remove ops that return their input unchanged in eval mode (dropout with train=False,
    alias, detach), so they do not stand between a batch-norm and a weight layer."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        is_eval_dropout = node.target is aten.dropout.default and not _arg(node, 2, "train", True)
        if (is_eval_dropout or node.target in _NO_OPS) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _is_constant(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` is computed from stored tensors only (no model input, nothing random)."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = True
        elif node.op == "call_function" and not node.is_impure() and "rand" not in _op_name(node):
            memo[node] = all(_is_constant(n, memo) for n in node.all_input_nodes)
        else:
            memo[node] = False
    return memo[node]


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> object:
    if node.op == "get_attr":
        return fetch_attribute(gm, node.target)
    args = fx.node.map_arg(node.args, lambda n: _evaluate(gm, n))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _evaluate(gm, n))
    return node.target(*args, **kwargs)


def _erase_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.users or node.op != "call_function" or node.is_impure():
        return
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for n in inputs:
        _erase_unused(gm, n)


def _materialize_computed_parameters(gm: fx.GraphModule) -> None:
    """Evaluate weights computed from stored tensors only (weight_norm, pruning masks,
    spectral_norm in eval mode) and store the results, so such layers can be folded."""
    memo: dict[fx.Node, bool] = {}
    counter = 0
    for node in list(gm.graph.nodes):
        indices = (1, 2) if _weight_layer(node) is not None else (1, 2, 3, 4) if _batchnorm_site(node) else ()
        for index in indices:
            arg = node.args[index] if index < len(node.args) else None
            if not isinstance(arg, fx.Node) or arg.op == "get_attr" or not _is_constant(arg, memo):
                continue
            with torch.no_grad():
                value = _evaluate(gm, arg)
            if not isinstance(value, Tensor):
                continue
            name = f"_bnfold_const_{counter}"
            counter += 1
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                stored = gm.graph.get_attr(name)
            stored.meta["val"] = value
            node.replace_input_with(arg, stored)
            _erase_unused(gm, arg)


def batchnorm_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every batch-norm op node of ``gm``."""
    return [site.node for site in map(_batchnorm_site, list(gm.graph.nodes)) if site is not None]


def remove_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop ``get_attr`` nodes nobody reads and the folded tensors they pointed to."""
    _FoldPass(gm).remove_unused_attributes()
    gm.recompile()


def fold_graph(gm: fx.GraphModule, types: dict[str, str] | None = None) -> FoldReport:
    """Fold every foldable batch-norm of ``gm`` by rewriting its graph; weights are never modified.

    Folded weights are registered as new attributes, so a layer used at several call sites keeps
    its original weights at the others. ``types`` (module path -> class name) names the layers
    when the graph does not record its modules (e.g. converted TorchScript).
    Returns the report of every batch-norm.
    """
    _drop_no_ops(gm)
    _materialize_computed_parameters(gm)
    sites = [s for s in map(_batchnorm_site, list(gm.graph.nodes)) if s is not None]
    names = [s.name for s in sites]
    for i, site in enumerate(sites):
        if site.kind == "batch_norm" and "BatchNorm" in (types or {}).get(site.name, ""):
            site.kind = types[site.name]
        if names.count(site.name) > 1:
            site.name = f"{site.name} (call {names[: i + 1].count(site.name)})"
    for site in sites:
        if not site.uses_batch_stats:
            _check_statistics(gm, site)
    fold_pass = _FoldPass(gm)
    entries = [fold_pass.visit(site) for site in sites]
    for index, (site, entry) in enumerate(zip(sites, entries)):
        if entry.status == KEPT:
            site.node.meta[ENTRY_META] = index  # later passes (branch merging) update the entry
    fold_pass.remove_unused_attributes()
    gm.graph.lint()
    gm.recompile()
    return FoldReport(entries=entries)
