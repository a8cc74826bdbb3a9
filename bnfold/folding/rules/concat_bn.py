"""Split → weight layers → Concat (channels) → batch-norm (MixNet's mixed kernels).

The batch-norm's channels are the Concat's inputs side by side, so layer ``k`` takes the slice
``s[a:b], t[a:b]`` of its channels ``a..b`` (output-side fold, see :mod:`.conv_bn`). Exact when
the Concat is along the channel axis, nothing else reads it, and its inputs are distinct weight
layers that nothing else reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ...report import BatchNormEntry
from ..ops import arg, aten, channels_of, rank
from ..sites import BatchNormSite, GraphEdit, WeightLayer, folded_entry, weight_layer
from . import OUTPUT, Refusal, Rule, register


@dataclass
class Match:
    site: BatchNormSite
    concat: fx.Node
    layers: list[WeightLayer]
    widths: list[int]


def match(site: BatchNormSite, edit: GraphEdit) -> Match | Refusal | None:
    cat = site.source
    if cat.target is not aten.cat.default:
        return None
    parts = list(cat.args[0])
    dim, dims = int(arg(cat, 1, "dim", 0)), rank(cat)
    if len(cat.users) > 1:
        return Refusal(f"it normalises a Concat whose result {len(cat.users) - 1} other op(s) also read")
    if dims is None or dim % dims != 1:
        return Refusal("it normalises a Concat that is not along the channel axis")
    layers = [weight_layer(p, edit.store) for p in parts]
    if any(layer is None for layer in layers) or len(set(parts)) != len(parts):
        return Refusal("it normalises a Concat whose inputs are not all distinct conv/linear outputs")
    widths = [channels_of(p) for p in parts]
    if None in widths or sum(widths) != site.num_channels:
        return Refusal("channel mismatch between the Concat inputs and the batch-norm")
    problems = [edit.output_fold_problem(layer, w) for layer, w in zip(layers, widths)]
    if any(problems):
        return Refusal(f"it normalises a Concat and {next(p for p in problems if p)}")
    if any(layer.kind == "Linear" and rank(layer.node) != 2 for layer in layers):
        return Refusal("it normalises a Concat of Linear outputs that are not 2-D")
    return Match(site, cat, layers, widths)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    offset, shared = 0, False
    for layer, width in zip(m.layers, m.widths):
        shared |= edit.scale_output(m.site, layer, s[offset : offset + width], t[offset : offset + width])
        offset += width
    edit.remove(m.site, m.concat)
    names = ", ".join(layer.name for layer in m.layers)
    return folded_entry(m.site, names, f"{len(m.layers)} convs → Concat → {m.site.kind}, one slice each", shared)


register(Rule("concat_bn", OUTPUT, 10, match, rewrite))
