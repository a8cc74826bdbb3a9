"""Architectures of the sample models (also usable with ``--arch sample_models.architectures:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = True, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout), act())


class DigitsCNN(nn.Module):
    """(a) scikit-learn digits, 1x8x8: Conv-BN-ReLU blocks and a Linear-BatchNorm1d head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16), conv_bn_relu(16, 32), nn.MaxPool2d(2), conv_bn_relu(32, 32, bias=False)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """(b) a small ResNet with downsampling (1x1 conv + BN) shortcuts, 3x16x16 input."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, bias=False)
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_relu(cin, hidden, 1, bias=False, act=nn.ReLU6),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, bias=False, act=nn.ReLU6),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class TinyMobileNet(nn.Module):
    """(c) MobileNetV2-style: depthwise-separable inverted residual blocks, 3x16x16 input."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, width, 3, bias=False, act=nn.ReLU6),
            InvertedResidual(width, width, 1, 4),
            InvertedResidual(width, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            conv_bn_relu(24, 64, 1, bias=False, act=nn.ReLU6),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class TinySegNet(nn.Module):
    """(d) encoder-decoder: strided conv-BN encoder, ConvTranspose-BN decoder (one grouped)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(conv_bn_relu(3, 16, 3, 2), conv_bn_relu(16, 32, 3, 2))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 2, 2, groups=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 2, 2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class SignalNet(nn.Module):
    """(e) Conv1d-BatchNorm1d signal classifier (strided and dilated convs), 1x64 input."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 5, stride=2, padding=4, dilation=2),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, groups=4, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax(2))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): BN -> ReLU -> Conv twice, plus a shortcut.

    The first BN normalises the block input, which the identity shortcut also reads; a
    downsampling block's shortcut is BN -> 1x1 Conv (no padding), foldable on the input side.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class PreActResNet(nn.Module):
    """(f) pre-activation ResNet: BN -> ReLU -> Conv and BN -> Conv (input-side folds), 3x16x16."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(16, 16), PreActBlock(16, 32, 2), PreActBlock(32, 64, 2))
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.layers(self.stem(x)))).mean((2, 3)))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)


def tiny_resnet(num_classes: int = 4) -> TinyResNet:
    return TinyResNet(num_classes)


def mobilenet_tiny(num_classes: int = 4, width: int = 16) -> TinyMobileNet:
    return TinyMobileNet(num_classes, width)


def segnet_tiny(num_classes: int = 2) -> TinySegNet:
    return TinySegNet(num_classes)


def signal_net(num_classes: int = 4) -> SignalNet:
    return SignalNet(num_classes)


def preact_resnet(num_classes: int = 4) -> PreActResNet:
    return PreActResNet(num_classes)
