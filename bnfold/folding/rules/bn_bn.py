"""Batch-norm → batch-norm: two affine maps in a row are one.

``s₂·(s₁·x + t₁) + t₂ = (s₂·s₁)·x + (s₂·t₁ + t₂)``. The second batch-norm takes the composed
map, written back as its own parameters for its own ``running_var`` and ``eps``:
``gamma = s·sqrt(var₂ + eps₂)``, ``beta = t``, ``mean = 0``. It may then fold or stay itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...report import BatchNormEntry
from .. import math as fold_math
from ..sites import BatchNormSite, GraphEdit, batchnorm_site, folded_entry
from . import INPUT, Refusal, Rule, register


@dataclass
class Match:
    site: BatchNormSite
    next_bn: BatchNormSite


def match(site: BatchNormSite, edit: GraphEdit) -> Match | Refusal | None:
    users = list(site.output.users)
    next_bn = batchnorm_site(users[0], edit.store) if len(users) == 1 else None
    if next_bn is None or next_bn.source is not site.output:
        return None
    if next_bn.uses_batch_stats or not all(edit.store.is_stored_or_absent(r) for r in next_bn.tensors):
        return Refusal("the following batch-norm uses batch statistics or computed parameters")
    if next_bn.channels(edit.store) != site.num_channels:
        return Refusal("channel mismatch with the following batch-norm")
    return Match(site, next_bn)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    site, next_bn = m.site, m.next_bn
    s1, t1 = site.scale_shift(edit.store)
    s2, t2 = next_bn.scale_shift(edit.store)
    s, t = fold_math.compose_affine(s1, t1, s2, t2)
    var = edit.store.value(next_bn.var)
    gamma, beta, mean = fold_math.batchnorm_params_for(s, t, var, next_bn.eps)
    what = f"composing batch-norm '{site.name}' with '{next_bn.name}'"
    dtype = edit.store.dtype(next_bn.var)
    args = list(next_bn.node.args)
    for index, value, suffix in ((1, gamma, "weight"), (2, beta, "bias"), (3, mean, "running_mean")):
        args[index] = edit.store.add(value, suffix, dtype, what)
    next_bn.node.args = tuple(args)
    edit.remove(site, site.source)
    return folded_entry(site, next_bn.name, f"{site.kind} → {next_bn.kind}, composed")


register(Rule("bn_bn", INPUT, 10, match, rewrite))
