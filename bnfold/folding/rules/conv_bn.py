"""Weight layer → batch-norm (output side): Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear.

With the batch-norm's ``s, t``: ``W'[o] = s[o]·W[o]`` and ``b' = s·b + t`` (a transposed conv's
output channel ``o`` is dim 1 of its group's weight slice). Exact for any groups, stride,
dilation and padding. Linear → BatchNorm1d only when the Linear's output is 2-D ``[N, C]``: on
3-D input the batch-norm normalises dim 1 while the Linear acts on the last dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...report import BatchNormEntry
from ..ops import rank
from ..sites import BatchNormSite, GraphEdit, WeightLayer, folded_entry, weight_layer
from . import OUTPUT, Refusal, Rule, register


@dataclass
class Match:
    site: BatchNormSite
    layer: WeightLayer


def match(site: BatchNormSite, edit: GraphEdit) -> Match | Refusal | None:
    layer = weight_layer(site.source, edit.store)
    if layer is None:
        return None
    problem = edit.output_fold_problem(layer, site.num_channels)
    if problem is None and layer.kind == "Linear" and rank(layer.node) != 2:
        problem = (
            f"Linear '{layer.name}' output is {rank(layer.node)}-D: BatchNorm1d normalises dim 1 "
            "but Linear acts on the last dim, so folding would be wrong"
        )
    return Refusal(problem) if problem else Match(site, layer)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    shared = edit.scale_output(m.site, m.layer, s, t)
    edit.remove(m.site, m.layer.node)
    return folded_entry(m.site, m.layer.name, f"{m.layer.kind} → {m.site.kind}", shared)


register(Rule("conv_bn", OUTPUT, 30, match, rewrite))
