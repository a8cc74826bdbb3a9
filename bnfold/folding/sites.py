"""The graph model the fold rules work on: batch-norm sites, weight layers, and the edits.

A :class:`BatchNormSite` is one batch-norm call; a :class:`WeightLayer` one conv/linear call.
:class:`GraphEdit` holds every change a rule makes: store new weights (cast back to the layer's
dtype, checked for overflow), remove a folded batch-norm, and build the report entries, so each
rule is only its match and its algebra.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, fx

from ..report import AFFINE_OP, BATCH_NORM_OP, FOLDED, KEPT, BatchNormEntry
from . import math as fold_math
from .affine import AffineSite
from .ops import (
    BATCH_STATS_OPS,
    BATCHNORM_OPS,
    CONV_TRANSPOSE_OPS,
    GENERIC_CONV_OPS,
    LINEAR_OPS,
    WEIGHT_OPS,
    arg,
    aten,
    module_path,
    op_name,
    rank,
    value_users,
)
from .store import TensorStore

SHARED_NOTE = "; weights copied, other call sites keep the originals"


@dataclass
class BatchNormSite:
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
        return None if self.node.target in BATCH_STATS_OPS else self.node.args[3]

    @property
    def var(self) -> fx.Node | None:
        return None if self.node.target in BATCH_STATS_OPS else self.node.args[4]

    @property
    def nodes(self) -> list[fx.Node]:
        """The op, and the ``getitem`` that reads its result if there is one."""
        return [self.node] if self.output is self.node else [self.node, self.output]

    @property
    def tensors(self) -> tuple[fx.Node | None, ...]:
        """(weight, bias, running_mean, running_var)."""
        return self.weight, self.bias, self.mean, self.var

    def channels(self, store: TensorStore) -> int:
        """Number of channels it normalises."""
        for ref in (self.mean, self.weight):
            if store.is_stored(ref):
                return int(store.value(ref).numel())
        val = self.source.meta.get("val") if isinstance(self.source, fx.Node) else None
        return int(val.shape[1]) if val is not None and val.dim() > 1 else 0

    def scale_shift(self, store: TensorStore) -> tuple[Tensor, Tensor]:
        """Its float64 affine map ``(s, t)``: ``bn(x) = s * x + t``."""
        get = lambda ref: None if ref is None else store.value(ref)
        return fold_math.bn_scale_shift(get(self.mean), get(self.var), get(self.weight), get(self.bias), self.eps)


Site = BatchNormSite | AffineSite
"""What the fold rules fold: a batch-norm op, or a constant per-channel affine map."""


@dataclass
class WeightLayer:
    """One conv/linear call: ``node`` takes (input, weight, bias, ...)."""

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
        return arg(self.node, 2, "bias")

    def zero_pads_input(self) -> bool:
        """Whether the layer itself pads its input with zeros (a transposed conv's padding crops
        its output instead)."""
        if self.kind == "Linear" or self.transposed:
            return False
        padding = arg(self.node, 4, "padding", 0)
        if isinstance(padding, str):
            kernel = self.weight.meta["val"].shape[2:] if "val" in self.weight.meta else ()
            return padding == "same" and any(k > 1 for k in kernel)
        return any(int(p) != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))

    def out_channels(self, weight: Tensor) -> int:
        return weight.shape[1] * self.groups if self.transposed else weight.shape[0]

    def in_channels(self, weight: Tensor) -> int:
        return weight.shape[0] if self.transposed else weight.shape[1] * self.groups


def batchnorm_site(node: fx.Node, store: TensorStore | None = None) -> BatchNormSite | None:
    """The batch-norm call ``node`` is, if it is one."""
    if node.op != "call_function":
        return None
    if node.target in BATCH_STATS_OPS:
        training_idx, eps_idx, returns_tuple, has_stats = None, 5, True, False
    elif node.target in BATCHNORM_OPS:
        (training_idx, eps_idx, returns_tuple), has_stats = BATCHNORM_OPS[node.target], True
    else:
        return None
    if node.target is aten.instance_norm.default and node.args[5]:
        return None  # normalises each sample by its own statistics: no batch-norm at all
    output = node
    if returns_tuple:
        # Only the normalised tensor (item 0) may be used for the batch-norm to be foldable; a
        # decomposed (core ATen) program also holds unused getitems of the saved statistics.
        items = [u for u in node.users if u.target is operator.getitem]
        firsts = [u for u in items if u.args[1] == 0]
        used_others = [u for u in items if u.args[1] != 0 and u.users]
        alone = len(items) == len(node.users) and not used_others
        output = firsts[0] if len(firsts) == 1 and alone else node
    training = bool(node.args[training_idx]) if training_idx is not None else False
    mean = node.args[3] if has_stats else None
    uses_batch_stats = not has_stats or training or mean is None or node.args[4] is None
    located = module_path(node)
    if located and "Norm" in located[1]:
        name, kind = located
    elif store is not None and store.is_stored(mean):
        name, kind = store.name(mean).split(", ")[0].rsplit(".", 1)[0], "batch_norm"
    else:
        name, kind = node.name, "batch_norm"
    return BatchNormSite(node, output, float(node.args[eps_idx]), uses_batch_stats, name or node.name, kind)


def weight_layer(node: object, store: TensorStore | None = None) -> WeightLayer | None:
    """The conv/linear call ``node`` is, if it is one."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in WEIGHT_OPS:
        return None
    weight = node.args[1]
    if node.target in GENERIC_CONV_OPS:
        transposed, groups = bool(node.args[6]), int(node.args[8])
    elif node.target in LINEAR_OPS:
        transposed, groups = False, 1
    else:
        transposed = node.target in CONV_TRANSPOSE_OPS
        groups = int(arg(node, 6, "groups", 1))
    if node.target in LINEAR_OPS:
        kind = "Linear"
    else:
        dims = weight.meta["val"].dim() if isinstance(weight, fx.Node) and "val" in weight.meta else None
        if dims is not None and rank(node) == dims - 1:
            return None  # an unbatched conv ([C, L] input): its channels are dim 0, not dim 1
        kind = ("ConvTranspose" if transposed else "Conv") + (f"{dims - 2}d" if dims else "")
    located = module_path(node)
    if located and located[0]:
        name = located[0]
    elif store is not None and store.is_stored(weight):
        name = store.name(weight).split(", ")[0].rsplit(".", 1)[0]
    else:
        name = node.name
    return WeightLayer(node, transposed, groups, kind, name)


def batchnorm_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Every batch-norm op node of ``graph``."""
    return [node for node in graph.nodes if batchnorm_site(node) is not None]


def kept_category(site: Site) -> str:
    """A short reason class, without layer names, for grouping kept batch-norms in the report."""
    if site.uses_batch_stats:
        return "uses batch statistics at inference"
    source = site.source
    if source.op == "placeholder":
        return "on a model input"
    if source.target is aten.cat.default:
        return "after Concat of shared features" if len(source.users) > 1 else "after Concat"
    layer = weight_layer(source)
    if layer is not None:
        if len(value_users(layer.node)) > 1:
            return f"after a {layer.kind.rstrip('123d')} whose output is also used elsewhere"
        return f"after a {layer.kind.rstrip('123d')} it cannot fold into"
    if batchnorm_site(source) is not None or source.target is operator.getitem:
        return "after another kept batch-norm"
    return f"after {op_name(source)}"


def describe_source(node: fx.Node) -> str:
    """Why a batch-norm reading ``node`` has no weight layer before it."""
    if node.op == "placeholder":
        return "it normalises a model input"
    if node.op == "call_function":
        if batchnorm_site(node) is not None or node.target is operator.getitem:
            return "its input is another batch-norm that stays"
        return f"its input comes from '{op_name(node)}', not directly from a conv/linear layer"
    return f"its input comes from {node.op} '{node.target}', not a conv/linear layer"


class GraphEdit:
    """The edits fold rules make to a captured program, and the report entries they produce."""

    def __init__(self, store: TensorStore) -> None:
        self.store = store
        self.graph = store.graph
        self.affine_maps: dict[fx.Node, AffineSite] = {}
        """Every constant affine map of the graph, by its first op."""

    def set_affine(self, site: AffineSite, s: Tensor, t: Tensor, what: str) -> None:
        """Make ``site`` compute ``s·x + t`` on its input: its ops become one multiplication (and
        one addition unless ``t`` is 0) by new stored constants in the activation's dtype."""
        source, last = site.source, site.output
        val = source.meta["val"]
        shape = (-1,) + (1,) * (val.dim() - 2)
        ops = [(aten.mul.Tensor, self.store.add(s.reshape(shape), "scale", val.dtype, what))]
        if bool((t != 0).any()):
            ops.append((aten.add.Tensor, self.store.add(t.reshape(shape), "shift", val.dtype, what)))
        nodes, current = [], source
        with self.graph.inserting_before(last):
            for target, constant in ops:
                current = self.graph.call_function(target, (current, constant))
                current.meta = dict(last.meta)
                nodes.append(current)
        last.replace_all_uses_with(current)
        for node in reversed(site.nodes):
            self.graph.erase_node(node)
        del self.affine_maps[site.node]
        site.nodes, site.operands, site.scale_shift_cache = nodes, [0] * len(nodes), None
        self.affine_maps[site.node] = site

    def stored_layer_problem(self, layer: WeightLayer, role: str = "") -> str | None:
        """Why ``layer``'s weights cannot be rewritten, if they cannot: computed at run time."""
        if self.store.is_stored(layer.weight) and self.store.is_stored_or_absent(layer.bias):
            return None
        return f"the weight of {role}{layer.kind} '{layer.name}' is computed at run time, not stored"

    def layer_sources(self, layer: WeightLayer) -> tuple[Callable[[], Tensor], Callable[[], Tensor | None]]:
        """Functions giving the layer's weight and bias (``None`` when it has none) as they are
        now (see :meth:`TensorStore.source`), for a rewrite's ``compute``."""
        return self.store.source(layer.weight), self.store.source(layer.bias)

    def set_weights(self, layer: WeightLayer, compute: Callable[[], tuple[Tensor, Tensor | None]], what: str) -> bool:
        """Give ``layer`` the new weights ``compute`` gives (float64, cast to its current dtype
        once the fold is proven; the weight is held as ``compute`` itself, the bias as a value);
        the originals stay for any other call site. Returns whether the layer is called at other
        sites (weights copied)."""
        store = self.store
        weight, bias = compute()
        weight_dtype = store.dtype(layer.weight)
        shared = len(layer.weight.users) > 1
        args = list(layer.node.args)
        args[1] = store.add(weight, "weight", weight_dtype, f"{what}: the weight", lambda: compute()[0])
        if bias is not None:
            bias_dtype = weight_dtype if layer.bias is None else store.dtype(layer.bias)
            new_bias = store.add(bias, "bias", bias_dtype, f"{what}: the bias")
            if len(args) > 2:
                args[2] = new_bias
            else:
                layer.node.kwargs = {**layer.node.kwargs, "bias": new_bias}
        layer.node.args = tuple(args)
        return shared

    def output_fold_problem(self, layer: WeightLayer, channels: int) -> str | None:
        """Why the output of ``layer`` cannot absorb a ``channels``-wide affine map, if it cannot."""
        readers = len(value_users(layer.node))
        if readers > 1:
            return f"the output of {layer.kind} '{layer.name}' is also used by {readers - 1} other op(s)"
        problem = self.stored_layer_problem(layer)
        if problem:
            return problem
        out_channels = layer.out_channels(self.store.like(layer.weight))
        if out_channels != channels:
            return (
                f"channel mismatch: {layer.kind} '{layer.name}' has {out_channels} outputs, the batch-norm {channels}"
            )
        return None

    def scale_output(self, site: Site, layer: WeightLayer, s: Tensor, t: Tensor) -> bool:
        """Scale ``layer``'s output channels by ``s`` and shift them by ``t``; returns whether
        its weights were shared with other call sites (and so were copied)."""
        weight, bias = self.layer_sources(layer)
        if layer.transposed:
            groups = layer.groups
            compute = lambda: fold_math.scale_transposed_output_channels(weight(), bias(), s, t, groups)
        else:
            compute = lambda: fold_math.scale_output_channels(weight(), bias(), s, t)
        return self.set_weights(layer, compute, f"folding batch-norm '{site.name}' into {layer.kind} '{layer.name}'")

    def input_fold_problem(self, layer: WeightLayer, t: Tensor, kind: str) -> str | None:
        """Why ``layer`` cannot absorb an affine map on its input with shift ``t``, if it cannot:
        zero padding would see 0 where the map gives ``t``, and a transposed conv spreads a
        shift unevenly over its output."""
        if bool((t == 0).all()):
            return None
        if layer.zero_pads_input():
            return (
                f"the following {layer.kind} '{layer.name}' zero-pads its input and the {kind}'s "
                "shift is non-zero, so folding would change the borders"
            )
        if layer.transposed:
            return f"the following {layer.kind} '{layer.name}' would spread a non-zero shift unevenly over its output"
        return None

    def scale_input(self, site: Site, layer: WeightLayer, s: Tensor, t: Tensor) -> bool:
        """Fold ``s·x + t`` on ``layer``'s input channels into it; returns whether its weights
        were shared with other call sites (and so were copied)."""
        weight, bias = self.layer_sources(layer)
        groups = layer.groups
        if layer.transposed:
            compute = lambda: fold_math.scale_transposed_input_channels(weight(), bias(), s)
        else:
            compute = lambda: fold_math.scale_input_channels(weight(), bias(), s, t, groups)
        return self.set_weights(layer, compute, f"folding '{site.name}' into {layer.kind} '{layer.name}'")

    def remove(self, site: Site, replacement: fx.Node) -> None:
        """Take the batch-norm or affine map out: its readers read ``replacement`` instead."""
        site.output.replace_all_uses_with(replacement)
        for node in reversed(site.nodes):
            for unused in [u for u in node.users if not u.users]:  # a saved statistic nobody reads
                self.graph.erase_node(unused)
            self.graph.erase_node(node)

    def erase_unused(self, node: fx.Node) -> None:
        """Erase ``node`` and, recursively, the inputs only it read."""
        if node.users or node.op != "call_function" or node.is_impure():
            return
        inputs = node.all_input_nodes
        self.graph.erase_node(node)
        for n in inputs:
            self.erase_unused(n)


def _op(site: Site) -> str:
    return AFFINE_OP if isinstance(site, AffineSite) else BATCH_NORM_OP


def folded_entry(site: Site, into: str, pattern: str, shared: bool = False) -> BatchNormEntry:
    """The report entry of a folded batch-norm or affine map."""
    pattern += SHARED_NOTE if shared else ""
    return BatchNormEntry(site.name, site.kind, site.num_channels, FOLDED, into=into, pattern=pattern, op=_op(site))


def kept_entry(site: Site, reason: str, category: str | None = None) -> BatchNormEntry:
    """The report entry of a batch-norm or affine map that stays, with its reason."""
    category = category or kept_category(site)
    return BatchNormEntry(site.name, site.kind, site.num_channels, KEPT, reason=reason, category=category, op=_op(site))
