"""Linear → Reshape/Flatten/Permute/Transpose → BatchNorm1d (LeViT).

The reshapes only move values, so the batch-norm folds into the Linear's output (see
:mod:`.conv_bn`) when they carry the Linear's feature (last) axis, unsplit and unmerged, to the
batch-norm's channel axis (dim 1); otherwise channel ``c`` of the batch-norm mixes features.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ...report import BatchNormEntry
from ..ops import VIEW_OPS, feature_axis_through, op_name, value_users
from ..sites import BatchNormSite, GraphEdit, WeightLayer, folded_entry, weight_layer
from . import OUTPUT, Refusal, Rule, register


@dataclass
class Match:
    site: BatchNormSite
    layer: WeightLayer
    reshape: fx.Node
    """The op the batch-norm reads (the last of the chain)."""


def match(site: BatchNormSite, edit: GraphEdit) -> Match | Refusal | None:
    node = site.source
    if node.target not in VIEW_OPS:
        return None
    chain = [node]
    while chain[-1].args and isinstance(chain[-1].args[0], fx.Node) and chain[-1].args[0].target in VIEW_OPS:
        chain.append(chain[-1].args[0])
    layer = weight_layer(chain[-1].args[0], edit.store)
    if layer is None or layer.kind != "Linear":
        return Refusal(f"its input comes from '{op_name(node)}', not directly from a conv/linear layer")
    if any(len(value_users(n)) > 1 for n in chain):
        return Refusal("the reshaped Linear output is also used elsewhere")
    if feature_axis_through(layer.node, list(reversed(chain))) != 1:
        return Refusal(
            f"the reshape between Linear '{layer.name}' and the batch-norm does not put the Linear's "
            "features on the batch-norm's channel axis, so folding would be wrong"
        )
    problem = edit.output_fold_problem(layer, site.num_channels)
    return Refusal(problem) if problem else Match(site, layer, node)


def rewrite(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    shared = edit.scale_output(m.site, m.layer, s, t)
    edit.remove(m.site, m.reshape)
    return folded_entry(m.site, m.layer.name, f"Linear → {op_name(m.reshape)} → {m.site.kind}", shared)


register(Rule("reshape_bn", OUTPUT, 20, match, rewrite))
