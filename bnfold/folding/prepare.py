"""Before the fold rules run: take out eval-mode no-ops, store batch-norms of stored tensors and
weights computed from stored tensors as the constants they are, and check every batch-norm's
statistics."""

from __future__ import annotations

import torch
from torch import Tensor, fx

from ..errors import FoldError
from ..report import BatchNormEntry
from .affine import AFFINE_OPS, IN_PLACE_AFFINE_OPS, activation_operand
from .ops import NO_OPS, arg, aten
from .sites import BatchNormSite, GraphEdit, batchnorm_site, folded_entry, weight_layer
from .store import TensorStore, constant_tensor, evaluate


def drop_no_ops(graph: fx.Graph) -> None:
    """Remove ops that return their input unchanged in eval mode (dropout with train=False,
    alias, detach), so they do not stand between a batch-norm and a weight layer."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        is_eval_dropout = node.target is aten.dropout.default and not arg(node, 2, "train", True)
        if (is_eval_dropout or node.target in NO_OPS) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _computed_operands(node: fx.Node, store: TensorStore, memo: dict[fx.Node, bool]) -> tuple[int, ...]:
    """Which arguments of ``node`` may hold weights computed from stored tensors: a weight
    layer's weight and bias, a batch-norm's parameters, the constant side of an element-wise
    affine op (a frozen batch-norm's ``scale``/``shift``)."""
    if weight_layer(node) is not None:
        return (1, 2)
    if batchnorm_site(node) is not None:
        return (1, 2, 3, 4)
    constant = lambda v: isinstance(v, fx.Node) and constant_tensor(store, v, memo)
    index = activation_operand(node, constant, AFFINE_OPS | IN_PLACE_AFFINE_OPS.keys())
    return () if index is None else (1 - index,)


def _store_computed(edit: GraphEdit, computed: fx.Node, what: str) -> fx.Node | None:
    """Evaluate ``computed`` (a node of stored tensors only) in float64 and store the result, cast
    to its dtype once proven; None when it is not a tensor."""
    value = evaluate(edit.store, computed)
    if not isinstance(value, Tensor):
        return None
    val = computed.meta.get("val")
    dtype = val.dtype if isinstance(val, Tensor) else value.dtype
    stored = edit.store.add(value.detach().clone(), "computed", dtype, what)
    edit.store.derive(stored, _stored_inputs(computed))
    return stored


def _stored_inputs(node: fx.Node) -> list[fx.Node]:
    """The placeholders a constant node is computed from, in graph order."""
    found: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            found[current] = None
        stack.extend(current.all_input_nodes)
    return sorted(found, key=lambda n: n.name)


def store_constant_batchnorms(edit: GraphEdit) -> list[BatchNormEntry]:
    """Replace every batch-norm of a stored tensor (a learned positional map, a constant input)
    by its value, computed once: the report entries of those batch-norms."""
    store, memo = edit.store, {}
    entries = []
    for node in list(store.graph.nodes):
        site = batchnorm_site(node, store)
        if site is None or node._erased or not all(constant_tensor(store, a, memo) for a in node.all_input_nodes):
            continue
        site.num_channels = site.channels(store)
        if not site.uses_batch_stats:
            check_statistics(store, site)
        stored = _store_computed(edit, site.output, f"batch-norm '{site.name}' of a stored tensor")
        if stored is None:
            continue
        source = site.source
        edit.remove(site, stored)
        edit.erase_unused(source)
        entries.append(folded_entry(site, "a stored constant", f"{site.kind} of a stored tensor, computed once"))
    return entries


def store_computed_parameters(edit: GraphEdit) -> None:
    """Evaluate weights computed from stored tensors only (weight_norm, pruning masks,
    spectral_norm in eval mode, a frozen batch-norm's scale and shift) and store the results, so
    such layers and maps can be folded."""
    store = edit.store
    memo: dict[fx.Node, bool] = {}
    for node in list(store.graph.nodes):
        if node._erased:  # an input of an earlier computed weight
            continue
        for index in _computed_operands(node, store, memo):
            computed = node.args[index] if index < len(node.args) else None
            if store.is_stored(computed) or not constant_tensor(store, computed, memo):
                continue
            stored = _store_computed(edit, computed, f"the computed tensor '{computed.name}'")
            if stored is None:
                continue
            node.replace_input_with(computed, stored)
            edit.erase_unused(computed)


def check_statistics(store: TensorStore, site: BatchNormSite) -> None:
    """NaN/inf anywhere, or a negative running variance, is a FoldError naming the layer."""
    labels = ("weight", "bias", "running_mean", "running_var")
    for label, ref in zip(labels, site.tensors):
        if not store.is_stored(ref):
            continue
        value = store.value(ref).detach()
        bad = ~torch.isfinite(value)
        if bad.any():
            raise FoldError(
                f"batch-norm '{site.name}' has {int(bad.sum())} NaN/inf value(s) in its {label}: "
                "the checkpoint is corrupt or training diverged; re-train or recalibrate it."
            )
        if label == "running_var" and ((value.double() + site.eps) == 0).any():
            raise FoldError(
                f"batch-norm '{site.name}' has {int(((value.double() + site.eps) == 0).sum())} zero running_var "
                "value(s) with eps=0: it divides by zero; the checkpoint is corrupt (or set eps > 0)."
            )
        if label == "running_var" and (value < 0).any():
            raise FoldError(
                f"batch-norm '{site.name}' has {int((value < 0).sum())} negative running_var "
                f"value(s) (min {float(value.min()):.3g}): a variance cannot be negative; "
                "the checkpoint is corrupt."
            )
