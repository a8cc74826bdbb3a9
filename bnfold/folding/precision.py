"""Converting a folded graph to float16: after folding (never before), and only when every stored
tensor fits, so a tiny running variance with a large gamma is an error instead of a silent inf."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import FoldError
from .ops import fetch_attribute
from .sites import batchnorm_site, weight_layer

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def describe_attribute_use(gm: fx.GraphModule, node: fx.Node) -> str:
    """Name what a stored tensor is, for errors: "the weight of Conv2d 'layer1.conv'" and the like."""
    for user in node.users:
        layer = weight_layer(user)
        if layer is not None:
            role = "weight" if user.args[1] is node else "bias"
            return f"the {role} of {layer.kind} '{layer.name}'"
        site = batchnorm_site(user)
        if site is not None:
            role = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}.get(
                list(user.args).index(node), "tensor"
            )
            return f"the {role} of batch-norm '{site.name}'"
    return f"tensor '{node.target}'"


def to_float16(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm`` float16 copies of all its floating stored tensors, after checking each fits.

    The tensors are replaced, never converted in place: a captured graph shares its parameters
    with the user's module.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attribute(gm, node.target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == torch.float16:
            continue
        largest = float(value.detach().abs().max()) if value.numel() else 0.0
        if largest > FLOAT16_MAX:
            raise FoldError(
                f"{describe_attribute_use(gm, node)} does not fit float16: its largest magnitude is "
                f"{largest:.4g} > {FLOAT16_MAX:g} (typically a tiny running_var with a large weight); "
                "export in float32, or fix or recalibrate the statistics"
            )
        prefix, _, leaf = node.target.rpartition(".")
        owner = gm.get_submodule(prefix) if prefix else gm
        half = value.detach().to(torch.float16)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(half, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = half
        else:
            setattr(owner, leaf, half)
    gm.recompile()
    return gm


def with_float32_io(gm: fx.GraphModule) -> fx.GraphModule:
    """Cast float inputs to float16 on entry and float16 outputs to float32 on exit, in the graph
    (``--keep-io-types``), so the model keeps its signature and takes and returns float32."""
    graph = gm.graph
    to_copy = torch.ops.aten._to_copy.default
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"]:
        val = placeholder.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            continue
        with graph.inserting_after(placeholder):
            cast = graph.call_function(to_copy, (placeholder,), {"dtype": torch.float16})
        # Every reader takes the float16 copy, except the cast itself and torch.export's input
        # guard (a call_module), which checks the caller's float32 input.
        placeholder.replace_all_uses_with(
            cast, delete_user_cb=lambda user, c=cast: user is not c and user.op != "call_module"
        )

    def to_float32(node: object) -> object:
        # The capture's metadata predates the float16 conversion: floating there means float16 now.
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            return graph.call_function(to_copy, (node,), {"dtype": torch.float32})
        return node  # integer outputs (indices, masks) keep their type

    output = graph.output_node()
    with graph.inserting_before(output):
        outputs = torch.utils._pytree.tree_map(to_float32, output.args[0])
    output.args = (outputs,)
    graph.lint()
    gm.recompile()
    return gm
