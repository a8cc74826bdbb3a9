"""The fold pass: find batch-norms on a captured ATen graph, fold them into the neighbouring
weight layer where that is exact, and report every one of them."""

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

# Batch-norm ops: name -> (index of the "training" flag or None, index of eps, returns a tuple?)
_BATCHNORM_OPS: dict[object, tuple[int | None, int, bool]] = {
    aten.batch_norm.default: (5, 7, False),
    aten._native_batch_norm_legit_no_training.default: (None, 6, True),
    aten._native_batch_norm_legit.default: (5, 7, True),
    aten.native_batch_norm.default: (5, 7, True),
}
# Ops that normalise with batch statistics and have no running stats at all.
_BATCH_STATS_OPS = {aten._native_batch_norm_legit.no_stats}

# Weight layers. Every one takes (input, weight, bias, ...): weight at 1, bias at 2.
_CONV_OPS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
}  # fmt: skip
_CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_GENERIC_CONV_OPS = {aten.convolution.default, aten._convolution.default}
_LINEAR_OPS = {aten.linear.default}
_WEIGHT_OPS = _CONV_OPS | _CONV_TRANSPOSE_OPS | _GENERIC_CONV_OPS | _LINEAR_OPS


def _fetch(gm: fx.GraphModule, target: str) -> Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _module_path(node: fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the innermost module that produced ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


@dataclass
class _BatchNormSite:
    node: fx.Node
    output: fx.Node
    """The node carrying the normalised tensor (the op itself, or its ``getitem(0)``)."""
    weight: fx.Node | None
    bias: fx.Node | None
    mean: fx.Node | None
    var: fx.Node | None
    eps: float
    uses_batch_stats: bool
    name: str
    kind: str

    @property
    def source(self) -> fx.Node:
        """The node the batch-norm normalises, read live (earlier folds rewire it)."""
        return self.node.args[0]


@dataclass
class _WeightLayer:
    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool
    groups: int
    kind: str
    name: str


def _batchnorm_site(node: fx.Node) -> _BatchNormSite | None:
    if node.op != "call_function":
        return None
    if node.target in _BATCH_STATS_OPS:
        training_idx, eps_idx, returns_tuple, has_stats = None, 4, True, False
    elif node.target in _BATCHNORM_OPS:
        training_idx, eps_idx, returns_tuple = _BATCHNORM_OPS[node.target]
        has_stats = True
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
    var = node.args[4] if has_stats else None
    uses_batch_stats = not has_stats or training or mean is None or var is None
    located = _module_path(node)
    if located and "BatchNorm" in located[1]:
        name, kind = located
    elif isinstance(mean, fx.Node) and mean.op == "get_attr":
        name, kind = mean.target.rsplit(".", 1)[0], "batch_norm"
    else:
        name, kind = node.name, "batch_norm"
    return _BatchNormSite(
        node=node, output=output,
        weight=node.args[1], bias=node.args[2], mean=mean, var=var,
        eps=float(node.args[eps_idx]), uses_batch_stats=uses_batch_stats,
        name=name or node.name, kind=kind,
    )  # fmt: skip


def _weight_layer(node: fx.Node) -> _WeightLayer | None:
    if node.op != "call_function" or node.target not in _WEIGHT_OPS:
        return None
    weight, bias = node.args[1], _arg(node, 2, "bias")
    if node.target in _GENERIC_CONV_OPS:
        transposed, groups = bool(node.args[6]), int(node.args[8])
    elif node.target in _LINEAR_OPS:
        transposed, groups = False, 1
    else:
        transposed = node.target in _CONV_TRANSPOSE_OPS
        groups = int(_arg(node, 6, "groups", 1))
    weight_dims = weight.meta["val"].dim() if isinstance(weight, fx.Node) and "val" in weight.meta else None
    if node.target in _LINEAR_OPS:
        kind = "Linear"
    else:
        spatial = f"{weight_dims - 2}d" if weight_dims else ""
        kind = ("ConvTranspose" if transposed else "Conv") + spatial
    located = _module_path(node)
    if located and located[0]:
        name = located[0]
    elif isinstance(weight, fx.Node) and weight.op == "get_attr":
        name = weight.target.rsplit(".", 1)[0]
    else:
        name = node.name
    return _WeightLayer(node, weight, bias, transposed, groups, kind, name)


def _is_stored(node: object) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


def _describe_source(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "it normalises a model input"
    if node.op == "call_function":
        if _batchnorm_site(node) is not None or node.target is operator.getitem:
            return "its input is another batch-norm that stays"
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return f"its input comes from '{op}', not directly from a conv/linear layer"
    return f"its input comes from {node.op} '{node.target}', not a conv/linear layer"


def _check_statistics(gm: fx.GraphModule, site: _BatchNormSite) -> None:
    for label, ref in (("running_mean", site.mean), ("running_var", site.var), ("weight", site.weight), ("bias", site.bias)):
        if not (isinstance(ref, fx.Node) and ref.op == "get_attr"):
            continue
        value = _fetch(gm, ref.target).detach()
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

    def _new_attr(self, value: Tensor, before: fx.Node, suffix: str) -> fx.Node:
        name = f"_bnfold_{self.counter}_{suffix}"
        self.counter += 1
        self.gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def keep(self, site: _BatchNormSite, reason: str) -> BatchNormEntry:
        return BatchNormEntry(site.name, site.kind, self._channels(site), KEPT, reason=reason)

    def _channels(self, site: _BatchNormSite) -> int:
        for ref in (site.mean, site.weight):
            if isinstance(ref, fx.Node) and ref.op == "get_attr":
                return int(_fetch(self.gm, ref.target).numel())
        val = site.source.meta.get("val") if isinstance(site.source, fx.Node) else None
        return int(val.shape[1]) if val is not None and val.dim() > 1 else 0

    def visit(self, site: _BatchNormSite) -> BatchNormEntry:
        if site.uses_batch_stats:
            return self.keep(site, "track_running_stats=False: it normalises with batch statistics at inference")
        if site.output is site.node and site.node.target is not aten.batch_norm.default:
            return self.keep(site, "its saved mean/invstd outputs are used elsewhere")
        if not all(_is_stored(r) for r in (site.weight, site.bias, site.mean, site.var)):
            return self.keep(site, "its parameters are computed at run time, not stored")
        layer = _weight_layer(site.source)
        if layer is None:
            return self.keep(site, _describe_source(site.source))
        if len(layer.node.users) > 1:
            others = len(layer.node.users) - 1
            return self.keep(site, f"the output of {layer.kind} '{layer.name}' is also used by {others} other op(s)")
        if not (_is_stored(layer.weight) and layer.weight is not None and _is_stored(layer.bias)):
            return self.keep(site, f"the weight of {layer.kind} '{layer.name}' is computed at run time, not stored")
        out_val = layer.node.meta.get("val")
        if layer.kind == "Linear" and out_val is not None and out_val.dim() != 2:
            return self.keep(
                site,
                f"Linear '{layer.name}' output is {out_val.dim()}-D: BatchNorm1d normalises dim 1 "
                "but Linear acts on the last dim, so folding would be wrong",
            )
        return self._fold(site, layer)

    def _fold(self, site: _BatchNormSite, layer: _WeightLayer) -> BatchNormEntry:
        gm = self.gm
        weight = _fetch(gm, layer.weight.target)
        bias = None if layer.bias is None else _fetch(gm, layer.bias.target)
        mean, var = _fetch(gm, site.mean.target), _fetch(gm, site.var.target)
        gamma = None if site.weight is None else _fetch(gm, site.weight.target)
        beta = None if site.bias is None else _fetch(gm, site.bias.target)
        out_channels = weight.shape[1] * layer.groups if layer.transposed else weight.shape[0]
        if out_channels != mean.numel():
            return self.keep(
                site, f"channel mismatch: {layer.kind} '{layer.name}' has {out_channels} outputs, the batch-norm {mean.numel()}"
            )
        s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, site.eps)
        if layer.transposed:
            new_w, new_b = fold_math.scale_transposed_output_channels(weight, bias, s, t, layer.groups)
        else:
            new_w, new_b = fold_math.scale_output_channels(weight, bias, s, t)
        what = f"folding batch-norm '{site.name}' into {layer.kind} '{layer.name}'"
        new_w = _cast_checked(new_w, weight, f"{what}: the weight")
        new_b = _cast_checked(new_b, weight if bias is None else bias, f"{what}: the bias")

        shared = len(layer.weight.users) > 1
        w_node = self._new_attr(new_w, layer.node, "weight")
        b_node = self._new_attr(new_b, layer.node, "bias")
        args = list(layer.node.args)
        args[1] = w_node
        if len(args) > 2:
            args[2] = b_node
            layer.node.args = tuple(args)
        else:
            layer.node.args = tuple(args)
            layer.node.kwargs = {**layer.node.kwargs, "bias": b_node}
        site.output.replace_all_uses_with(layer.node)
        for node in dict.fromkeys((site.output, site.node)):
            gm.graph.erase_node(node)
        pattern = f"{layer.kind} → {site.kind}"
        if shared:
            pattern += "; weights copied, other call sites keep the originals"
        return BatchNormEntry(site.name, site.kind, mean.numel(), FOLDED, into=layer.name, pattern=pattern)

    def remove_unused_attributes(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name in [n for n, _ in self.gm.named_parameters() if n.startswith("_bnfold_") and n not in used]:
            delattr(self.gm, name)


def fold_graph(gm: fx.GraphModule, types: dict[str, str] | None = None) -> FoldReport:
    """Fold every foldable batch-norm of ``gm`` in place of the graph; weights are never modified.

    New folded weights are registered as new attributes, so a layer used at several call sites
    keeps its original weights at the others. ``types`` (module path -> class name) names the
    layers when the graph does not record its modules (e.g. converted TorchScript).
    Returns the report of every batch-norm.
    """
    sites = [s for s in map(_batchnorm_site, list(gm.graph.nodes)) if s is not None]
    for site in sites:
        if site.kind == "batch_norm" and "BatchNorm" in (types or {}).get(site.name, ""):
            site.kind = types[site.name]
    names = [s.name for s in sites]
    for i, site in enumerate(sites):
        if names.count(site.name) > 1:
            site.name = f"{site.name} (call {names[: i + 1].count(site.name)})"
    for site in sites:
        if not site.uses_batch_stats:
            _check_statistics(gm, site)
    fold_pass = _FoldPass(gm)
    entries = [fold_pass.visit(site) for site in sites]
    fold_pass.remove_unused_attributes()
    gm.graph.lint()
    gm.recompile()
    return FoldReport(entries=entries)
