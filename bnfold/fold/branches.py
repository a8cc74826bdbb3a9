"""Multi-branch blocks summed by an Add (RepVGG, MobileOne, RepGhost style), merged into one conv.

After the batch-norm pass, such a block reads ``conv_kxk(x) + conv_1x1(x) + bn(x)`` (each conv
with its batch-norm already folded), optionally with ``bn(avg_pool(x))`` or a bare ``x``. Every
branch is linear in ``x``, so the sum is one k×k conv with bias (structural re-parameterisation):
pad the smaller kernels to the centre, express identity and average-pool branches as per-channel
kernels, and add them up, in float64.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
from torch import fx

from ..report import FOLDED, FoldReport
from . import math as fold_math
from .graph import (
    ENTRY_META,
    _arg,
    _batchnorm_site,
    _BatchNormSite,
    _cast_checked,
    _erase_unused,
    _FoldPass,
    _is_stored,
    _weight_layer,
    _WeightLayer,
    fetch_attribute,
)

aten = torch.ops.aten
_ADD = aten.add.Tensor
_AVG_POOLS = {aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default}


@dataclass
class _Branch:
    term: fx.Node
    source: fx.Node
    """The tensor this branch reads (the block input)."""
    layer: _WeightLayer | None = None
    site: _BatchNormSite | None = None
    pool: fx.Node | None = None


def _add_terms(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The summands of an Add tree rooted at ``root`` and the Add nodes themselves."""
    terms: list[fx.Node] = []
    adds: list[fx.Node] = []

    def collect(node: fx.Node) -> None:
        is_add = node.op == "call_function" and node.target is _ADD and _arg(node, 2, "alpha", 1) == 1
        if is_add and all(isinstance(a, fx.Node) for a in node.args[:2]) and (node is root or len(node.users) == 1):
            adds.append(node)
            for arg in node.args[:2]:
                collect(arg)
        else:
            terms.append(node)

    collect(root)
    return terms, adds


def _classify(term: fx.Node) -> _Branch:
    layer = _weight_layer(term)
    if layer is not None and layer.kind.startswith("Conv") and not layer.transposed:
        return _Branch(term, term.args[0], layer=layer)
    bn_node = term.args[0] if term.target is operator.getitem and term.args else term
    site = _batchnorm_site(bn_node) if isinstance(bn_node, fx.Node) else None
    if site is not None and not site.uses_batch_stats:
        source = site.source
        if source.target in _AVG_POOLS:
            return _Branch(term, source.args[0], site=site, pool=source)
        return _Branch(term, source, site=site)
    if term.op == "call_function" and term.target in _AVG_POOLS:
        return _Branch(term, term.args[0], pool=term)
    return _Branch(term, term)  # a bare identity term: the block input itself


def _ints(value: object, dims: int, default: int) -> tuple[int, ...]:
    if value is None or value == []:
        return (default,) * dims
    values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values * dims if len(values) == 1 else values


def _conv_geometry(layer: _WeightLayer, gm: fx.GraphModule) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) of a conv layer."""
    weight = fetch_attribute(gm, layer.weight.target)
    kernel = tuple(weight.shape[2:])
    dims = len(kernel)
    node = layer.node
    stride = _ints(_arg(node, 3, "stride", 1), dims, 1)
    padding = _arg(node, 4, "padding", 0)
    if isinstance(padding, str):
        padding = tuple((k - 1) // 2 for k in kernel) if padding == "same" else (0,) * dims
    dilation = _ints(_arg(node, 5, "dilation", 1), dims, 1)
    return kernel, stride, _ints(padding, dims, 0), dilation


class _Merger:
    def __init__(self, gm: fx.GraphModule, report: FoldReport) -> None:
        self.gm, self.report = gm, report

    def try_merge(self, root: fx.Node) -> None:
        terms, adds = _add_terms(root)
        if len(terms) < 2:
            return
        branches = [_classify(t) for t in terms]
        convs = [b for b in branches if b.layer is not None]
        if not convs:
            return
        source = convs[0].source
        if any(b.source is not source for b in branches):
            return  # not a block over one input (e.g. a plain residual of two paths)
        problem = self._problem(branches, convs)
        if problem:
            for b in branches:
                if b.site is not None and ENTRY_META in b.site.node.meta:
                    entry = self.report.entries[b.site.node.meta[ENTRY_META]]
                    self.report.entries[b.site.node.meta[ENTRY_META]] = replace(
                        entry,
                        reason=f"in a multi-branch block that cannot be merged: {problem}",
                        category="multi-branch block that cannot be merged",
                    )
            return
        self._merge(root, adds, branches, convs)

    def _problem(self, branches: list[_Branch], convs: list[_Branch]) -> str | None:
        if any(len(b.term.users) != 1 for b in branches):
            return "a branch output is also used elsewhere"
        geometry = [_conv_geometry(c.layer, self.gm) for c in convs]
        main = max(range(len(convs)), key=lambda i: math.prod(geometry[i][0]))
        kernel, stride, padding, _ = geometry[main]
        weights = [fetch_attribute(self.gm, c.layer.weight.target) for c in convs]
        ref = weights[main]
        for c, (k, s, p, d), w in zip(convs, geometry, weights):
            if not (_is_stored(c.layer.weight) and _is_stored(c.layer.bias)):
                return f"the weight of {c.layer.kind} '{c.layer.name}' is computed at run time"
            if c.layer.groups != convs[main].layer.groups or w.shape[:2] != ref.shape[:2]:
                return f"{c.layer.kind} '{c.layer.name}' has other groups or channel counts than the main branch"
            if s != stride:
                return f"{c.layer.kind} '{c.layer.name}' has stride {s}, the main branch {stride}"
            if any(dd != 1 for dd in d):
                return f"{c.layer.kind} '{c.layer.name}' is dilated"
            if any((kk - ki) % 2 or pi + (kk - ki) // 2 != pk for kk, ki, pi, pk in zip(kernel, k, p, padding)):
                return f"{c.layer.kind} '{c.layer.name}' is not centred on the main branch's kernel (padding {p})"
        channel_wise = [b for b in branches if b.layer is None]
        if channel_wise:
            out_ch, cin_per_group = ref.shape[0], ref.shape[1]
            in_ch = cin_per_group * convs[main].layer.groups
            if out_ch != in_ch or out_ch // convs[main].layer.groups != cin_per_group:
                return f"an identity branch needs as many output as input channels per group ({in_ch} in, {out_ch} out)"
            if any(kk % 2 == 0 or pk != (kk - 1) // 2 for kk, pk in zip(kernel, padding)):
                return "an identity branch needs the main kernel to keep the size (odd kernel, 'same' padding)"
        for b in channel_wise:
            if b.pool is None and any(si != 1 for si in stride):
                return f"an identity branch needs stride 1 (the convs have stride {stride})"
            if b.pool is not None:
                problem = self._pool_problem(b.pool, kernel, stride)
                if problem:
                    return problem
        return None

    def _pool_problem(self, pool: fx.Node, kernel: tuple[int, ...], stride: tuple[int, ...]) -> str | None:
        dims = len(kernel)
        k = _ints(_arg(pool, 1, "kernel_size", 1), dims, 1)
        s = _ints(_arg(pool, 2, "stride", None), dims, 0) if _arg(pool, 2, "stride", None) else k
        p = _ints(_arg(pool, 3, "padding", 0), dims, 0)
        if (
            _arg(pool, 4, "ceil_mode", False)
            or not _arg(pool, 5, "count_include_pad", True)
            or _arg(pool, 6, "divisor_override", None)
        ):
            return "the average pool branch does not divide by the full kernel (ceil_mode/count_include_pad/divisor_override)"
        if s != stride or any(ki > kk or ki % 2 == 0 or pi != (ki - 1) // 2 for ki, kk, pi in zip(k, kernel, p)):
            return f"the average pool branch (kernel {k}, stride {s}, padding {p}) does not line up with the convs"
        return None

    def _merge(self, root: fx.Node, adds: list[fx.Node], branches: list[_Branch], convs: list[_Branch]) -> None:
        geometry = [_conv_geometry(c.layer, self.gm) for c in convs]
        main_index = max(range(len(convs)), key=lambda i: math.prod(geometry[i][0]))
        main = convs[main_index].layer
        kernel = geometry[main_index][0]
        ref = fetch_attribute(self.gm, main.weight.target)
        cin_per_group = ref.shape[1]
        weight = torch.zeros(ref.shape[0], cin_per_group, *kernel, dtype=torch.float64)
        bias = torch.zeros(ref.shape[0], dtype=torch.float64)
        for c in convs:
            weight += fold_math.pad_kernel(fetch_attribute(self.gm, c.layer.weight.target), kernel)
            if c.layer.bias is not None:
                bias += fetch_attribute(self.gm, c.layer.bias.target).to(torch.float64)
        for b in branches:
            if b.layer is not None:
                continue
            scale, shift = (
                b.site.scale_shift(self.gm)
                if b.site is not None
                else (torch.ones(ref.shape[0], dtype=torch.float64), None)
            )
            values = None
            if b.pool is not None:
                k = _ints(_arg(b.pool, 1, "kernel_size", 1), len(kernel), 1)
                box = torch.full((1, 1, *k), 1.0 / math.prod(k), dtype=torch.float64)
                values = fold_math.pad_kernel(box, kernel)[0, 0]
            weight += fold_math.channel_kernel(scale, cin_per_group, kernel, values)
            if shift is not None:
                bias += shift
        what = f"merging the branches of {main.kind} '{main.name}'"
        new_w = _cast_checked(weight, ref, f"{what}: the weight")
        new_b = _cast_checked(bias, ref, f"{what}: the bias")
        shared = len(main.weight.users) > 1
        _FoldPass(self.gm)._set_weights(main, new_w, new_b)
        root.replace_all_uses_with(main.node)
        for add in adds:  # root first: each Add's only user is the one before it
            self.gm.graph.erase_node(add)
        for b in branches:
            if b.term is not main.node:
                _erase_unused(self.gm, b.term)
        self._update_report(main, branches, convs, shared)

    def _update_report(self, main: _WeightLayer, branches: list[_Branch], convs: list[_Branch], shared: bool) -> None:
        merged = {c.layer.name for c in convs if c.layer is not main}
        suffix = f"; parallel branches merged into {main.kind} '{main.name}'"
        for i, entry in enumerate(self.report.entries):
            if entry.status == FOLDED and (entry.into in merged or entry.into == main.name):
                self.report.entries[i] = replace(entry, into=main.name, pattern=(entry.pattern or "") + suffix)
        for b in branches:
            if b.site is not None and ENTRY_META in b.site.node.meta:
                index = b.site.node.meta[ENTRY_META]
                what = "average pool → BN" if b.pool is not None else "identity BN"
                pattern = f"{what} branch merged into {main.kind} (multi-branch re-parameterisation)"
                if shared:
                    pattern += "; weights copied, other call sites keep the originals"
                self.report.entries[index] = replace(
                    self.report.entries[index],
                    status=FOLDED,
                    into=main.name,
                    pattern=pattern,
                    reason=None,
                    category=None,
                )


def merge_parallel_branches(gm: fx.GraphModule, report: FoldReport) -> None:
    """Merge every multi-branch conv block of ``gm`` into one conv, updating ``report``."""
    merger = _Merger(gm, report)
    roots = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target is _ADD
        and not (len(n.users) == 1 and next(iter(n.users)).target is _ADD)
    ]
    for root in roots:
        if not root._erased:  # an earlier merge may have removed it
            merger.try_merge(root)
    gm.graph.lint()
    gm.recompile()
