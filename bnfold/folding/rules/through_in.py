"""Batch-norm (or affine map) → ops it commutes with → weight layer (input side, at a distance).

``layer(P(s·x + t)) = layer(s·P(x) + t)`` for every op ``P`` of :mod:`..commuting` (pooling,
means, resampling; max pooling with ``s > 0``), so the map folds into the layer's input side
exactly as :mod:`.bn_conv` folds it, after the ops; a flatten of ``[N, C, ...]`` to ``[N, C·k]``
repeats each channel's ``s, t`` over its ``k`` features. E.g. a batch-norm before global pooling
and a Linear head. The same exactness conditions as :mod:`.bn_conv` apply to the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ...report import BatchNormEntry
from ..commuting import CHANNEL_PRESERVING, commute_problem, flatten_factor
from ..ops import op_name, rank
from ..sites import GraphEdit, Site, WeightLayer, folded_entry, weight_layer
from . import INPUT, Refusal, Rule, register


@dataclass
class Match:
    site: Site
    layer: WeightLayer
    chain: list[fx.Node]
    repeat: int
    """Features per channel after a flatten (1 without one)."""


def _chain(site: Site) -> tuple[list[fx.Node], int, fx.Node | None]:
    """The commuting ops after ``site`` (each the only reader of the one before), the flatten
    factor, and the op after them."""
    chain, repeat, node = [], 1, site.output
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.args[0] is not node:
            break
        factor = flatten_factor(user) if repeat == 1 else None
        if user.target not in CHANNEL_PRESERVING and factor is None:
            return chain, repeat, user
        repeat *= factor or 1
        chain.append(user)
        node = user
    return chain, repeat, None


def match(site: Site, edit: GraphEdit) -> Match | Refusal | None:
    chain, repeat, after = _chain(site)
    layer = weight_layer(after, edit.store)
    if not chain or layer is None or layer.node.args[0] is not chain[-1]:
        return None
    problem = edit.stored_layer_problem(layer, "the following ")
    if problem:
        return Refusal(problem)
    s, t = site.scale_shift(edit.store)
    through = next((p for p in (commute_problem(op, s, t) for op in chain) if p), None)
    if through:
        return Refusal(f"it does not commute with the ops before the following {layer.kind}: {through}")
    weight = edit.store.like(layer.weight)
    if layer.in_channels(weight) != site.num_channels * repeat:
        return Refusal(
            f"channel mismatch: the following {layer.kind} '{layer.name}' takes {layer.in_channels(weight)} channels"
        )
    if layer.kind == "Linear" and rank(chain[-1]) != 2:
        return Refusal(f"the following Linear '{layer.name}' acts on the last dim of a {rank(chain[-1])}-D tensor")
    problem = edit.input_fold_problem(layer, t, site.kind)
    if problem:
        return Refusal(problem)
    return Match(site, layer, chain, repeat)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    site, layer = m.site, m.layer
    s, t = site.scale_shift(edit.store)
    s, t = s.repeat_interleave(m.repeat), t.repeat_interleave(m.repeat)
    shared = edit.scale_input(site, layer, s, t)
    edit.remove(site, site.source)
    ops = " → ".join(op_name(op) for op in m.chain)
    return folded_entry(site, layer.name, f"{site.kind} → {ops} → {layer.kind}, input side", shared)


register(Rule("through_in", INPUT, 40, match, rewrite))
