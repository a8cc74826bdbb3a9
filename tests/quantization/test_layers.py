"""The weight layers INT8 is about, named after their PyTorch modules; the ones ONNX Runtime's
quantizer cannot quantize per channel are marked."""

from __future__ import annotations

import onnx
from helpers import random_input
from torch import nn

import bnfold
from bnfold.quantization.layers import weight_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        y = self.up(self.conv(x))
        return self.head(y * y)  # a product of two activations: no weight layer


def test_weight_layers_are_named_after_their_modules(tmp_path):
    path = bnfold.export(Net().eval(), (random_input(1, 3, 4, 4),), tmp_path / "m.onnx", verify=False).path
    layers = weight_layers(onnx.load(path))
    assert [(layer.name, layer.op_type) for layer in layers] == [
        ("conv", "Conv"),
        ("up", "ConvTranspose"),
        ("head.1", "Gemm"),
    ]
    assert [layer.unsupported is not None for layer in layers] == [False, True, False]
    assert "grouped ConvTranspose" in layers[1].unsupported
