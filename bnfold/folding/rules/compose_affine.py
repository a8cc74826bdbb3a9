"""Batch-norm (or affine map) → constant per-channel affine map: two affine maps in a row are one.

``s₂·(s₁·x + t₁) + t₂ = (s₂·s₁)·x + (s₂·t₁ + t₂)``, as in :mod:`.bn_bn`, here with the second
map a chain of element-wise ops (a ``FrozenBatchNorm2d``, a layer scale): its ops become
``x·s + t`` with the composed constants, stored in the activation's dtype, and it then folds or
stays as itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...report import BatchNormEntry
from .. import math as fold_math
from ..affine import AffineSite
from ..sites import GraphEdit, Site, folded_entry
from . import INPUT, Refusal, Rule, register


@dataclass
class Match:
    site: Site
    next_map: AffineSite


def match(site: Site, edit: GraphEdit) -> Match | Refusal | None:
    users = list(site.output.users)
    next_map = edit.affine_maps.get(users[0]) if len(users) == 1 else None
    if next_map is None or next_map.source is not site.output or next_map.refusal:
        return None
    if next_map.num_channels != site.num_channels:
        return Refusal("channel mismatch with the following affine map")
    return Match(site, next_map)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    site, next_map = m.site, m.next_map
    s, t = fold_math.compose_affine(*site.scale_shift(edit.store), *next_map.scale_shift(edit.store))
    edit.set_affine(next_map, s, t, f"composing '{site.name}' with '{next_map.name}'")
    edit.remove(site, site.source)
    return folded_entry(site, next_map.name, f"{site.kind} → {next_map.kind}, composed")


register(Rule("compose_affine", INPUT, 20, match, rewrite))
