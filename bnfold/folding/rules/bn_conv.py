"""Batch-norm → weight layer (input side): the batch-norm feeds a conv/linear, alone.

``layer(s·x + t) = layer'(x)`` with ``W'[:, i] = W[:, i]·s[i]`` per group and
``b' = b + Σ W·t`` (a transposed conv: ``W'[i] = s[i]·W[i]``). Exact when the layer sees every
input value through the affine map: no zero padding (the padded border would see 0 instead of
``t``), unless ``t = 0``; padding modes that copy input values (reflect, replicate, circular),
in the layer or as a ``pad`` op in between, commute with it. A transposed conv spreads a shift
unevenly over its output, so only ``t = 0`` folds there. BatchNorm1d → Linear only on 2-D input.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ...report import BatchNormEntry
from ..ops import arg, aten, rank
from ..sites import BatchNormSite, GraphEdit, WeightLayer, folded_entry, weight_layer
from . import INPUT, Refusal, Rule, register

# Padding modes that commute with a per-channel affine map (the padded values are input values).
AFFINE_COMMUTING_PAD_MODES = {"reflect", "replicate", "circular"}


@dataclass
class Match:
    site: BatchNormSite
    layer: WeightLayer
    pad: fx.Node | None


def match(site: BatchNormSite, edit: GraphEdit) -> Match | Refusal | None:
    users = list(site.output.users)
    if len(users) != 1:
        return None
    consumer, pad = users[0], None
    is_pad = consumer.op == "call_function" and consumer.target is aten.pad.default
    if is_pad and len(consumer.users) == 1 and arg(consumer, 2, "mode", "constant") in AFFINE_COMMUTING_PAD_MODES:
        pad, consumer = consumer, next(iter(consumer.users))
    layer = weight_layer(consumer, edit.store)
    if layer is None or layer.node.args[0] is not (pad or site.output):
        return None
    problem = edit.stored_layer_problem(layer, "the following ")
    if problem:
        return Refusal(problem)
    weight = edit.store.like(layer.weight)
    if layer.in_channels(weight) != site.num_channels:
        return Refusal(
            f"channel mismatch: the following {layer.kind} '{layer.name}' takes {layer.in_channels(weight)} channels"
        )
    source_rank = rank(site.source)
    if layer.kind == "Linear" and source_rank is not None and source_rank != 2:
        return Refusal(
            f"it normalises dim 1 of a {source_rank}-D tensor but the following Linear '{layer.name}' acts on the last dim"
        )
    _, t = site.scale_shift(edit.store)
    problem = edit.input_fold_problem(layer, t, site.kind)
    if problem:
        return Refusal(problem)
    return Match(site, layer, pad)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    site, layer = m.site, m.layer
    s, t = site.scale_shift(edit.store)
    shared = edit.scale_input(site, layer, s, t)
    edit.remove(site, site.source)
    through = f", through {arg(m.pad, 2, 'mode')} padding" if m.pad is not None else ""
    return folded_entry(site, layer.name, f"{site.kind} → {layer.kind}, input side{through}", shared)


register(Rule("bn_conv", INPUT, 30, match, rewrite))
