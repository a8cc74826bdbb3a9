"""Small models of the kinds deployed at many input sizes (an encoder-decoder with skip
concatenations, an FPN, a DeepLabV3 with atrous convolutions and global pooling, a YOLO-style
detector), models whose code fixes their size, and a hand-built dynamic-size ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorms
from onnx import TensorProto, helper
from torch import nn

from bnfold.image_sizes import AxisSizes, ImageSizes
from bnfold.metadata import Preprocess, image_size_props, metadata_props


def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (3x3) -> BN -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class UNetLike(nn.Module):
    """Encoder (stride 8) and decoder joined by skip concatenations: heights and widths must be
    multiples of 8."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.ModuleList([block(3, 8), block(8, 8, 2), block(8, 16, 2), block(16, 16, 2)])
        self.dec = nn.ModuleList([block(32, 16), block(24, 8), block(16, 8)])
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.enc:
            x = layer(x)
            skips.append(x)
        x = skips.pop()
        for layer in self.dec:
            x = layer(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        return self.head(x)


class FPNLike(nn.Module):
    """Bottom-up (stride 16), top-down with lateral 1x1 convs and nearest upsampling by 2, a head
    resized to the input: heights and widths must be multiples of 16."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.stages = nn.ModuleList([block(3, 8, 2), block(8, 16, 2), block(16, 16, 2), block(16, 16, 2)])
        self.lateral = nn.ModuleList([nn.Conv2d(c, 8, 1) for c in (8, 16, 16, 16)])
        self.smooth = block(8, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        top = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            top = lateral(feature) + F.interpolate(top, scale_factor=2.0, mode="nearest")
        return F.interpolate(self.head(self.smooth(top)), size=size, mode="bilinear", align_corners=False)


class DeepLabLike(nn.Module):
    """Backbone of output stride 4 with atrous convolutions, ASPP (atrous branches and a
    global-pooling branch), a head upsampled bilinearly to the input size: any size above a
    smallest one."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(block(3, 8, 2), block(8, 16, 2), block(16, 16, dilation=2))
        self.aspp = nn.ModuleList([block(16, 8, dilation=d) for d in (1, 3, 6)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.project = block(32, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        y = self.project(torch.cat([*(branch(f) for branch in self.aspp), pooled], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


class YoloLike(nn.Module):
    """A detector: backbone of strides 8, 16 and 32, a neck that upsamples and concatenates, a
    head per stride whose boxes are decoded on a grid made (and cached, as YOLOv5 does) in the
    forward: heights and widths must be multiples of 32. Output: ``[N, boxes, 5 + classes]``."""

    def __init__(self, classes: int = 2, anchors: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(block(3, 8, 2), block(8, 8, 2), block(8, 16, 2))  # stride 8
        self.down16, self.down32 = block(16, 16, 2), block(16, 16, 2)
        self.fuse16, self.fuse8 = block(32, 16), block(32, 16)
        self.anchors, self.outputs = anchors, 5 + classes
        self.heads = nn.ModuleList([nn.Conv2d(16, anchors * self.outputs, 1) for _ in range(3)])
        self.strides = (8, 16, 32)
        self.grid: list[torch.Tensor] = [torch.empty(0)] * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p8 = self.stem(x)
        p16 = self.down16(p8)
        p32 = self.down32(p16)
        p16 = self.fuse16(torch.cat([F.interpolate(p32, scale_factor=2.0), p16], 1))
        p8 = self.fuse8(torch.cat([F.interpolate(p16, scale_factor=2.0), p8], 1))
        boxes = []
        for i, (feature, stride) in enumerate(zip((p8, p16, p32), self.strides)):
            n, _, ny, nx = feature.shape
            y = self.heads[i](feature).view(n, self.anchors, self.outputs, ny, nx).permute(0, 1, 3, 4, 2)
            if self.grid[i].shape[2:4] != y.shape[2:4]:
                self.grid[i] = self._grid(nx, ny)
            xy = (y[..., :2].sigmoid() + self.grid[i]) * stride
            boxes.append(torch.cat([xy, y[..., 2:]], -1).reshape(n, -1, self.outputs))
        return torch.cat(boxes, 1)

    @staticmethod
    def _grid(nx: int, ny: int) -> torch.Tensor:
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        return torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()


class HardReshape(nn.Module):
    """Flattens its features with a hard-coded size: it takes 16x16 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = block(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.view(y.shape[0], 4, 16 * 16).mean(-1)  # fixes the size


class PositionalEmbedding(nn.Module):
    """Patches of 4x4 plus a learned positional embedding of 16 patches: 16x16 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8))
        self.position = nn.Parameter(torch.randn(1, 16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return (tokens + self.position).mean(1)  # fixes the size


class CachedGrid(nn.Module):
    """Adds a grid registered at 8x8 (an anchor grid made once, at the training size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 2, 3, 2, 1), nn.BatchNorm2d(2))
        self.register_buffer("grid", YoloLike._grid(8, 8).view(1, 8, 8, 2).permute(0, 3, 1, 2).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sigmoid() + self.grid  # fixes the size


def model(kind: type[nn.Module], seed: int = 0) -> nn.Module:
    """A ``kind`` with seeded weights and batch-norm statistics far from the identity, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorms(kind(), seed)


def halving_onnx(path: Path, *, preprocess: bool = True) -> Path:
    """A hand-built dynamic-size model: ``x`` [N, 1, H, W] -> ``y`` [N, 1, H/2, W/2], the mean of
    each 2x2 block, then ``mean`` [N, 1]; heights and widths multiples of 2 from 2, traced at
    4x6; preprocessing keeps each grayscale image's size (pixels scaled to [0, 1])."""
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("ReduceMean", ["y"], ["mean"], axes=[2, 3], keepdims=0),
        ],
        "halving",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H2", "W2"]),
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 1]),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    steps = Preprocess(size=None, mean=(0.0,), std=(1.0,), channel_order="L") if preprocess else None
    sizes = {"x": ImageSizes(AxisSizes(2, 2), AxisSizes(2, 2), (4, 6))}
    helper.set_model_props(onnx_model, metadata_props(None, steps) | image_size_props(sizes))
    onnx.save(onnx_model, str(path))
    return path


def halved(x: np.ndarray) -> np.ndarray:
    """What :func:`halving_onnx`'s ``y`` is for ``x``."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
