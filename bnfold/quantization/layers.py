"""The layers INT8 quantization is about: the ONNX graph's weight layers (Conv, ConvTranspose,
Gemm, MatMul with a stored weight), named after the PyTorch module each came from, and those
ONNX Runtime's quantizer cannot quantize per channel."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# torch.onnx.export records the module path of every node: ['', 'layers', 'layers.0', 'layers.0.conv1', 'conv2d_1'].
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class WeightLayer:
    """A node of the ONNX graph that multiplies by a stored weight."""

    node: str
    """The ONNX node name (what ONNX Runtime's ``nodes_to_exclude`` takes)."""
    op_type: str
    name: str
    """The PyTorch module it came from, else the node name."""
    unsupported: str | None = None
    """Why ONNX Runtime's quantizer cannot quantize it (it stays float), or ``None``."""


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """The weight layers of ``model``'s main graph, in graph order."""
    stored = {init.name for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 2 or node.input[1] not in stored:
            continue  # a product of two activations: nothing stored to quantize
        layers.append(WeightLayer(node.name, node.op_type, module_name(node), _unsupported(node)))
    return layers


def module_name(node: onnx.NodeProto) -> str:
    """The PyTorch module ``node`` was exported from (``layers.0.conv1``), else its node name."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
    return node.name


def _unsupported(node: onnx.NodeProto) -> str | None:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if node.op_type == "ConvTranspose" and group > 1:
        # Its weight [Cin, Cout/groups, k...] has no axis of output channels: ONNX Runtime's
        # per-channel scales (one per Cout/groups) would not match its bias (one per Cout).
        return "grouped ConvTranspose: ONNX Runtime cannot quantize its weights per output channel"
    return None
