"""Issue families of real architectures: multi-branch blocks, split-concat, reshapes, batch-norms
found through Add/Concat/pooling/activations, and shared features (kept)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import onnx_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from test_patterns import fold_and_export, kept_reason, statuses
from torch import nn

from bnfold.fold import math as fold_math


def model_ops(tmp_path, op: str) -> int:
    return onnx_ops(tmp_path / "model.onnx", op)


# ------------------------------------------------------------------ 1. multi-branch blocks
class RepBlock(nn.Module):
    """RepVGG / MobileOne training-time block: kxk conv-BN + 1x1 conv-BN (+ identity BN)
    (+ avg-pool-BN), summed."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        identity: bool = True,
        pool: bool = False,
        one_by_one_padding: int = 0,
        dilation: int = 1,
        count_include_pad: bool = True,
    ) -> None:
        super().__init__()
        self.kxk = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.k1 = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, one_by_one_padding, groups=groups), nn.BatchNorm2d(cout)
        )
        self.identity = nn.BatchNorm2d(cout) if identity else None
        self.pool = (
            nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=count_include_pad), nn.BatchNorm2d(cout))
            if pool
            else None
        )

    def forward(self, x):
        y = self.kxk(x) + self.k1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.pool is not None:
            y = y + self.pool(x)
        return torch.relu(y)


@pytest.mark.parametrize(
    "block, bns",
    [
        (RepBlock(4, 4), 3),
        (RepBlock(4, 4, groups=2), 3),
        (RepBlock(4, 4, k=5), 3),
        (RepBlock(4, 4, pool=True), 4),
        (RepBlock(4, 8, stride=2, identity=False), 2),
        (RepBlock(4, 4, groups=4), 3),
    ],
    ids=["repvgg", "grouped", "5x5", "mobileone-pool", "strided-no-identity", "depthwise"],
)
def test_multi_branch_block_becomes_one_conv(block, bns, tmp_path):
    folded = fold_and_export(nn.Sequential(block, nn.Conv2d(block.kxk[0].out_channels, 2, 1)), (2, 4, 8, 8), tmp_path)
    assert statuses(folded) == ["folded"] * bns
    assert {e.into for e in folded.report.entries} == {"0.kxk.0"}
    assert model_ops(tmp_path, "Conv") == 2 and model_ops(tmp_path, "Add") == 0


@pytest.mark.parametrize(
    "block, reason",
    [
        (RepBlock(4, 4, dilation=2), "is dilated"),
        (RepBlock(4, 4, identity=True, pool=True, count_include_pad=False), "count_include_pad"),
    ],
    ids=["dilated", "pool-excluding-padding"],
)
def test_multi_branch_block_that_cannot_be_merged_is_refused_with_the_reason(block, reason, tmp_path):
    folded = fold_and_export(block, (2, 4, 8, 8), tmp_path)
    kept = [e for e in folded.report.entries if e.status == "kept"]
    assert kept and all(reason in e.reason and e.category == "multi-branch block that cannot be merged" for e in kept)
    assert model_ops(tmp_path, "Conv") == 2


class SharedBranch(RepBlock):
    def forward(self, x):
        side = self.k1(x)
        return self.kxk(x) + side + self.identity(x), side


def test_a_branch_read_elsewhere_blocks_the_merge(tmp_path):
    assert "also used elsewhere" in kept_reason(fold_and_export(SharedBranch(4, 4), (2, 4, 8, 8), tmp_path))


@st.composite
def blocks(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    k = draw(st.sampled_from([3, 5]))
    return dict(
        groups=groups,
        k=k,
        small=draw(st.sampled_from([1, 3])),
        stride=draw(st.integers(1, 2)),
        identity=draw(st.booleans()),
        pool=draw(st.sampled_from([0, 3])),
        seed=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=40, deadline=None)
@given(blocks())
def test_branch_merge_math(b):
    """sum of conv_k, conv_small, identity*s and avgpool*s branches == one conv_k, in float64."""
    c, g, k = 4, b["groups"], b["k"]
    gen = torch.Generator().manual_seed(b["seed"])
    f64 = torch.float64
    x = torch.randn(2, c, 9, 9, dtype=f64, generator=gen)
    w_k, w_s = (
        torch.randn(c, c // g, k, k, dtype=f64, generator=gen),
        torch.randn(c, c // g, b["small"], b["small"], dtype=f64, generator=gen),
    )
    bias = torch.randn(c, dtype=f64, generator=gen)
    stride = 1 if b["identity"] else b["stride"]
    expected = F.conv2d(x, w_k, bias, stride, k // 2, groups=g) + F.conv2d(
        x, w_s, None, stride, b["small"] // 2, groups=g
    )
    merged = fold_math.pad_kernel(w_k, (k, k)) + fold_math.pad_kernel(w_s, (k, k))
    scale = torch.rand(c, dtype=f64, generator=gen) + 0.5
    if b["identity"]:
        expected = expected + x * scale[None, :, None, None]
        merged = merged + fold_math.channel_kernel(scale, c // g, (k, k))
    if b["pool"] and b["pool"] <= k:
        p = b["pool"]
        expected = expected + F.avg_pool2d(x, p, stride, p // 2) * scale[None, :, None, None]
        box = fold_math.pad_kernel(torch.full((1, 1, p, p), 1 / p**2, dtype=f64), (k, k))[0, 0]
        merged = merged + fold_math.channel_kernel(scale, c // g, (k, k), box)
    got = F.conv2d(x, merged, bias, stride, k // 2, groups=g)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


# ---------------------------------------------------------------------- 2. split -> concat
class MixedKernels(nn.Module):
    """MixNet-style: channel groups convolved with different kernels, concatenated, one BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c3, self.c5 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        a, b = torch.split(x, [3, 3], dim=1)
        return self.bn(torch.cat([self.c3(a), self.c5(b)], dim=1))


def test_split_convs_concat_bn_folds_one_slice_into_each_conv(tmp_path):
    folded = fold_and_export(MixedKernels(), (2, 6, 8, 8), tmp_path)
    assert statuses(folded) == ["folded"] and folded.report.entries[0].into == "c3, c5"


class DenseLayer(nn.Module):
    """DenseNet: the concatenated features feed a BN and are also read by the next concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        features = torch.cat([self.c1(x), self.c2(x)], 1)
        return torch.cat([features, self.conv(torch.relu(self.bn(features)))], 1)


def test_bn_after_a_concat_of_shared_features_is_kept(tmp_path):
    folded = fold_and_export(DenseLayer(), (2, 3, 6, 6), tmp_path)
    assert "other op(s) also read" in kept_reason(folded)
    assert folded.report.kept_by_reason() == {"after Concat of shared features": 1}


# ---------------------------------------------------------------- 3. linear -> reshape -> BN
class LinearBN(nn.Module):
    """LeViT's Linear_BN: Linear on [B, N, C], flattened to [B*N, C] for BatchNorm1d, reshaped back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5 * 4 if how == "merge" else 5)

    def forward(self, x):
        y = self.fc(x)
        if self.how == "flatten":
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        if self.how == "permute":
            return self.bn(y.permute(0, 2, 1))
        return self.bn(y.reshape(y.shape[0], -1))  # "merge": BN channels are (token, feature) pairs


@pytest.mark.parametrize("how", ["flatten", "permute"])
def test_linear_reshape_batchnorm1d_is_folded(how, tmp_path):
    folded = fold_and_export(LinearBN(how), (2, 4, 6), tmp_path)
    assert statuses(folded) == ["folded"] and folded.report.entries[0].into == "fc"


def test_reshape_that_merges_the_feature_axis_is_refused(tmp_path):
    assert "does not put the Linear's features" in kept_reason(fold_and_export(LinearBN("merge"), (2, 4, 6), tmp_path))


# -------------------------------------------------- 4. BN found through other producers
class AfterProducer(nn.Module):
    def __init__(self, producer: str) -> None:
        super().__init__()
        self.producer = producer
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8 if producer == "cat" else 4)
        self.conv = nn.Conv2d(self.bn.num_features, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = {
            "add": lambda: a + b,
            "cat": lambda: torch.cat([a, b], 1),
            "pool": lambda: F.max_pool2d(a + b, 2),
            "activation": lambda: F.silu(a) + b,
        }[self.producer]()
        return self.conv(self.bn(y))


@pytest.mark.parametrize("producer", ["add", "cat", "pool", "activation"])
def test_bn_after_add_concat_pool_activation_folds_into_the_following_conv(producer, tmp_path):
    folded = fold_and_export(AfterProducer(producer), (2, 3, 6, 6), tmp_path)
    (entry,) = folded.report.entries
    if producer == "cat":  # folded on the output side, one slice into each conv
        assert entry.status == "folded" and entry.into == "a, b"
    else:
        assert entry.status == "folded" and entry.into == "conv" and "input side" in entry.pattern


# ---------------------------------------------------------------------- 5. report grouping
def test_kept_batchnorms_are_grouped_by_reason(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())
    folded = fold_and_export(model, (2, 3, 4, 4), tmp_path)
    assert folded.report.kept_by_reason() == {"after relu": 2}
    assert "kept, by reason: after relu: 2" in str(folded.report)
