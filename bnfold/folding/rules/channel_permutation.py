"""A per-channel affine map commutes with a channel permutation (ShuffleNet's channel shuffle:
``view → transpose → reshape``; ``index_select`` on dim 1 by a stored permutation; copies).

If the ops between a weight layer and a batch-norm only move values, and output channel ``c'``
of them holds, everywhere, values of one input channel ``p[c']`` (``p`` a bijection), then
``s[c']·P(y)[c'] + t[c'] = P(s'·y + t')[c']`` with ``s'[p[c']] = s[c']``, ``t'[p[c']] = t[c']``:
the batch-norm folds into the layer's output with its ``s, t`` permuted back (output side, see
:mod:`.conv_bn`). Before a layer, ``P(s·x + t)[c'] = s[p[c']]·P(x)[c'] + t[p[c']]``: it folds into
the layer's input side with ``s[p], t[p]`` (same exactness conditions as :mod:`.bn_conv`).

``p`` is read off the ops themselves: they are run on a batch of one whose values are their
channel index (the layer's output channels, or the batch-norm's), and each output channel must
then be one constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ...report import BatchNormEntry
from ..ops import VIEW_OPS, aten, op_name, shape, value_users
from ..sites import GraphEdit, Site, WeightLayer, folded_entry, weight_layer
from . import INPUT, OUTPUT, Refusal, Rule, register

MOVES = VIEW_OPS | {aten.clone.default, aten.contiguous.default, aten.index_select.default}


@dataclass
class Match:
    site: Site
    layer: WeightLayer
    chain: list[fx.Node]
    perm: Tensor
    """``perm[c']``: the channel before the ops that channel ``c'`` after them holds."""


def _batch_of_one(size: object) -> object:
    return 1 if isinstance(size, torch.SymInt) else size


def _permutation(chain: list[fx.Node], start: fx.Node, axis: int, edit: GraphEdit, axis_out: int) -> Tensor | None:
    """The channel permutation ``chain`` applies, reading channels of ``start`` on ``axis`` and
    of the chain's result on ``axis_out``; None when the ops do more than permute channels."""
    dims = shape(start)
    end = shape(chain[-1])
    if dims is None or end is None or not all(isinstance(d, int) for d in (*dims[1:], *end[1:])):
        return None
    sizes = (1, *dims[1:])
    index = torch.arange(sizes[axis], dtype=torch.float64).reshape([-1 if i == axis else 1 for i in range(len(sizes))])
    values: dict[fx.Node, object] = {start: index.expand(sizes).contiguous()}

    def concrete(arg: object) -> object:
        if isinstance(arg, fx.Node):
            if arg in values:
                return values[arg]
            if edit.store.is_stored(arg):
                return edit.store.value(arg)
            val = arg.meta.get("val")
            return 1 if isinstance(val, torch.SymInt) else None  # the batch, here of one
        return _batch_of_one(arg)

    try:
        for node in chain:
            args = torch.utils._pytree.tree_map(concrete, node.args)
            kwargs = torch.utils._pytree.tree_map(concrete, node.kwargs)
            values[node] = node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    out = values[chain[-1]]
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, *end[1:]):
        return None
    channels = out.movedim(axis_out, 0).reshape(out.shape[axis_out], -1)
    if channels.shape[1] == 0 or not bool((channels == channels[:, :1]).all()):
        return None
    perm = channels[:, 0].long()
    if sorted(perm.tolist()) != list(range(sizes[axis])):
        return None
    return perm


def _exclusive(chain: list[fx.Node]) -> bool:
    return all(len(value_users(node)) == 1 for node in chain)


def _channel_axis(layer: WeightLayer, node: fx.Node) -> int:
    """The axis of ``node`` (the layer's output or input) that holds the layer's channels."""
    return len(shape(node)) - 1 if layer.kind == "Linear" else 1


def match_output(site: Site, edit: GraphEdit) -> Match | Refusal | None:
    chain, node = [], site.source
    while node.op == "call_function" and node.target in MOVES and isinstance(node.args[0], fx.Node):
        chain.insert(0, node)
        node = node.args[0]
    layer = weight_layer(node, edit.store)
    if not chain or layer is None or not _exclusive(chain):
        return None
    perm = _permutation(chain, layer.node, _channel_axis(layer, layer.node), edit, 1)
    if perm is None:
        return None
    problem = edit.output_fold_problem(layer, site.num_channels)
    return Refusal(problem) if problem else Match(site, layer, chain, perm)


def rewrite_output(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    s_layer, t_layer = torch.empty_like(s), torch.empty_like(t)
    s_layer[m.perm], t_layer[m.perm] = s, t
    shared = edit.scale_output(m.site, m.layer, s_layer, t_layer)
    edit.remove(m.site, m.site.source)
    ops = " → ".join(op_name(op) for op in m.chain)
    return folded_entry(m.site, m.layer.name, f"{m.layer.kind} → {ops} → {m.site.kind}, channels permuted", shared)


def match_input(site: Site, edit: GraphEdit) -> Match | Refusal | None:
    chain, node = [], site.output
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in MOVES or user.args[0] is not node:
            break
        chain.append(user)
        node = user
    layer = weight_layer(next(iter(node.users)) if len(node.users) == 1 else None, edit.store)
    if not chain or layer is None or layer.node.args[0] is not chain[-1] or not _exclusive(chain):
        return None
    perm = _permutation(chain, site.output, 1, edit, _channel_axis(layer, chain[-1]))
    if perm is None:
        return None
    problem = edit.stored_layer_problem(layer, "the following ")
    weight = edit.store.like(layer.weight)
    if problem is None and layer.in_channels(weight) != site.num_channels:
        problem = (
            f"channel mismatch: the following {layer.kind} '{layer.name}' takes {layer.in_channels(weight)} channels"
        )
    _, t = site.scale_shift(edit.store)
    problem = problem or edit.input_fold_problem(layer, t, site.kind)
    return Refusal(problem) if problem else Match(site, layer, chain, perm)


def rewrite_input(m: Match, edit: GraphEdit) -> BatchNormEntry:
    s, t = m.site.scale_shift(edit.store)
    shared = edit.scale_input(m.site, m.layer, s[m.perm], t[m.perm])
    edit.remove(m.site, m.site.source)
    ops = " → ".join(op_name(op) for op in m.chain)
    return folded_entry(
        m.site, m.layer.name, f"{m.site.kind} → {ops} → {m.layer.kind}, input side, channels permuted", shared
    )


register(Rule("permutation_bn", OUTPUT, 25, match_output, rewrite_output))
register(Rule("bn_permutation", INPUT, 35, match_input, rewrite_input))
