"""Weight layer → ops a per-channel affine map commutes with → batch-norm (output side, at a
distance).

``s·P(layer(x)) + t = P(s·layer(x) + t)`` for every channel-preserving op ``P`` of
:mod:`..commuting` (pooling, resampling; max pooling only with ``s > 0``), so the batch-norm
folds into the layer's output as in :mod:`.conv_bn`, before the ops: e.g. a conv → max-pool →
batch-norm stem. Each op must be the only reader of the one before.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ...report import BatchNormEntry
from ..commuting import CHANNEL_PRESERVING, commute_problem
from ..ops import op_name, value_users
from ..sites import GraphEdit, Site, WeightLayer, folded_entry, weight_layer
from . import OUTPUT, Refusal, Rule, register


@dataclass
class Match:
    site: Site
    layer: WeightLayer
    chain: list[fx.Node]
    """The ops between the layer and the batch-norm, layer side first."""


def match(site: Site, edit: GraphEdit) -> Match | Refusal | None:
    chain, node = [], site.source
    while node.op == "call_function" and node.target in CHANNEL_PRESERVING and isinstance(node.args[0], fx.Node):
        if len(value_users(node)) != 1:
            return None
        chain.insert(0, node)
        node = node.args[0]
    layer = weight_layer(node, edit.store)
    if not chain or layer is None or layer.kind == "Linear":
        return None
    problem = edit.output_fold_problem(layer, site.num_channels)
    if problem:
        return Refusal(problem)
    s, t = site.scale_shift(edit.store)
    through = next((p for p in (commute_problem(op, s, t) for op in chain) if p), None)
    return (
        Refusal(f"it does not commute with the ops after {layer.kind} '{layer.name}': {through}")
        if through
        else Match(site, layer, chain)
    )


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    shared = edit.scale_output(m.site, m.layer, s, t)
    edit.remove(m.site, m.site.source)
    ops = " → ".join(op_name(op) for op in m.chain)
    return folded_entry(m.site, m.layer.name, f"{m.layer.kind} → {ops} → {m.site.kind}", shared)


register(Rule("through_out", OUTPUT, 40, match, rewrite))
