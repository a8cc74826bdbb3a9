"""Multi-branch blocks (RepVGG, MobileOne, ACNet): parallel conv-BN, identity-BN and avg-pool-BN
branches summed over one input merge into one conv. Merges go through the real merger
(``bnfold.folding.fold``) and must be exact in float64; each refusal keeps the block, and merging it
anyway (the same arithmetic, by hand) would be wrong."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fold_checks import (
    EXACT_RTOL,
    assert_fold_exact,
    assert_onnx_matches,
    assert_wrong,
    bn_affine,
    float64_copy,
    fold_checked,
    graph_ops,
    kept_reason,
    run,
    with_statistics,
)
from helpers import onnx_ops, random_input
from torch import nn

from bnfold.folding import math as fold_math

# The block rule merges branches whose batch-norms conv_bn folded first (it runs after the sites).
RULES = ("conv_bn", "multibranch")

CANNOT_MERGE = "multi-branch block that cannot be merged"


class Block(nn.Module):
    """Parallel branches over one input, summed: a conv-BN branch per entry of ``convs`` (keyword
    arguments of ``nn.Conv2d``), optionally an identity BN and an average-pool BN (``pool``: keyword
    arguments of ``nn.AvgPool2d``). No activation after the sum: a ReLU would hide errors in
    channels it zeroes."""

    def __init__(
        self,
        convs: list[dict],
        cin: int = 4,
        cout: int = 4,
        identity: bool = False,
        pool: dict | None = None,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, cout, **c), nn.BatchNorm2d(cout)) for c in convs)
        self.identity = nn.BatchNorm2d(cout) if identity else None
        self.pool = nn.Sequential(nn.AvgPool2d(**pool), nn.BatchNorm2d(cout)) if pool else None

    def forward(self, x):
        y = self.convs[0](x)
        for branch in [*self.convs[1:], self.identity, self.pool]:
            if branch is not None:
                y = y + branch(x)
        return y


def rep_block(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    identity: bool = True,
    pool: bool = False,
    dilation: int = 1,
    count_include_pad: bool = True,
) -> Block:
    """RepVGG / MobileOne training-time block: kxk conv-BN + 1x1 conv-BN (+ identity BN)
    (+ 3x3 avg-pool-BN), summed."""
    kxk = dict(kernel_size=k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False)
    k1 = dict(kernel_size=1, stride=stride, groups=groups)
    avg = dict(kernel_size=3, stride=stride, padding=1, count_include_pad=count_include_pad) if pool else None
    return Block([kxk, k1], cin, cout, identity=identity, pool=avg)


def naive_merge(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block`` merged into its largest conv whatever the geometry: each conv branch folded and
    padded, centred, to that conv's kernel; identity and average-pool branches as per-channel
    kernels (the pool's box counting the padding); one conv with the main conv's stride, padding,
    dilation and groups, as the merger would leave it. Float64."""
    b = float64_copy(block)
    main = max((branch[0] for branch in b.convs), key=lambda conv: math.prod(conv.kernel_size))
    kernel, cin_per_group = main.kernel_size, main.weight.shape[1]
    weight, bias = 0, 0
    for conv, bn in b.convs:
        w, c = fold_math.scale_output_channels(conv.weight, conv.bias, *bn_affine(bn))
        weight, bias = weight + fold_math.pad_kernel(w, kernel), bias + c
    if b.identity is not None:
        s, t = bn_affine(b.identity)
        weight, bias = weight + fold_math.channel_kernel(s, cin_per_group, kernel), bias + t
    if b.pool is not None:
        pool, bn = b.pool
        k = pool.kernel_size
        box = fold_math.pad_kernel(torch.full((1, 1, k, k), 1 / k**2, dtype=torch.float64), kernel)[0, 0]
        s, t = bn_affine(bn)
        weight, bias = weight + fold_math.channel_kernel(s, cin_per_group, kernel, box), bias + t
    return F.conv2d(x, weight, bias, main.stride, main.padding, main.dilation, main.groups)


# ------------------------------------------------------------------------------------ merged
def acnet_block() -> Block:
    """ACNet: 3x3 + 1x3 + 3x1 conv-BN branches and an identity BN."""
    asymmetric = [dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))]
    return Block([dict(kernel_size=3, padding=1), *asymmetric], identity=True)


MERGEABLE = {
    "repvgg": (lambda: rep_block(4, 4), 3),
    "grouped": (lambda: rep_block(4, 4, groups=2), 3),
    "5x5": (lambda: rep_block(4, 4, k=5), 3),
    "mobileone-pool": (lambda: rep_block(4, 4, pool=True), 4),
    "strided-no-identity": (lambda: rep_block(4, 8, stride=2, identity=False), 2),
    "depthwise": (lambda: rep_block(4, 4, groups=4), 3),
    "acnet": (acnet_block, 4),
}


@pytest.mark.parametrize("name", MERGEABLE)
def test_multi_branch_block_becomes_one_conv(name):
    make, bns = MERGEABLE[name]
    result = fold_checked(with_statistics(make()), random_input(2, 4, 8, 8), ["folded"] * bns)
    assert {e.into for e in result.report.entries} == {"convs.0.0"}
    assert graph_ops(result, "aten.conv") == 1 and graph_ops(result, "aten.add") == 0


@pytest.mark.parametrize("name", MERGEABLE)
def test_the_merge_by_hand_is_exact_where_the_merger_merges(name):
    """So the refusals below are wrong because of the geometry, not because of ``naive_merge``."""
    block = with_statistics(MERGEABLE[name][0]())
    x = random_input(2, 4, 8, 8).double()
    ref = run(float64_copy(block), x)[0]
    assert float((naive_merge(block, x) - ref).abs().max()) <= EXACT_RTOL * float(ref.abs().max())


def test_branches_whose_kernels_do_not_nest_are_not_merged_and_stay_exact():
    """(3, 1) + (1, 3): neither kernel holds the other (padding one into the other would crop it)."""
    block = Block([dict(kernel_size=(3, 1), padding=(1, 0)), dict(kernel_size=(1, 3), padding=(0, 1))])
    result = assert_fold_exact(with_statistics(block), random_input(2, 4, 6, 6), ["folded", "folded"])
    assert graph_ops(result, "aten.conv") == 2 and graph_ops(result, "aten.add") == 1


# ------------------------------------------------------------ refused, and why merging would be wrong
def assert_refused(block: Block, x: torch.Tensor, reason: str) -> None:
    """The fold keeps the block's identity/pool batch-norm with the merge refusal as its reason
    (and stays exact), and merging the block anyway would change its output."""
    result = assert_fold_exact(block, x)
    kept = [e for e in result.report.entries if e.status == "kept"]
    assert kept and all(reason in e.reason and e.category == CANNOT_MERGE for e in kept), kept
    reference = run(float64_copy(block), x)[0]
    naive = naive_merge(block, x)
    assert_wrong(reference, naive.expand_as(reference))  # a strided merge also shrinks the output


def test_refused_other_groups_than_the_main_branch():
    block = Block([dict(kernel_size=3, padding=1), dict(kernel_size=1, groups=4)], identity=True)
    assert_refused(with_statistics(block), random_input(2, 4, 6, 6).double(), "other groups or channel counts")


def test_refused_stride_mismatch():
    """5x5 input: the 3x3 (stride 1, no padding) and the 1x1 (stride 2) both give 3x3 outputs."""
    block = Block([dict(kernel_size=3), dict(kernel_size=1, stride=2)], pool=dict(kernel_size=3, stride=1, padding=0))
    assert_refused(with_statistics(block), random_input(2, 4, 5, 5).double(), "has stride (2, 2), the main branch")


def test_refused_identity_with_stride():
    """2x2 input: the stride-2 convs give 1x1, broadcast over the 2x2 identity."""
    block = Block([dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1, stride=2)], identity=True)
    assert_refused(with_statistics(block), random_input(2, 4, 2, 2).double(), "an identity branch needs stride 1")


def test_refused_pool_larger_than_the_main_kernel():
    block = Block([dict(kernel_size=3, padding=1), dict(kernel_size=1)], pool=dict(kernel_size=5, stride=1, padding=2))
    assert_refused(with_statistics(block), random_input(2, 4, 6, 6).double(), "does not line up with the convs")


def test_refused_pool_excluding_padding():
    block = rep_block(4, 4, pool=True, count_include_pad=False)
    assert_refused(with_statistics(block), random_input(2, 4, 8, 8).double(), "count_include_pad")


def test_refused_dilated_branch():
    block = Block([dict(kernel_size=5, padding=2), dict(kernel_size=3, padding=2, dilation=2)], identity=True)
    assert_refused(with_statistics(block), random_input(2, 4, 8, 8).double(), "is dilated")


def test_refused_dilated_main_branch():
    """Merging would be exact here (the 1x1 and the identity sit on the dilated kernel's centre
    tap), but the merger refuses any dilation."""
    result = assert_fold_exact(with_statistics(rep_block(4, 4, dilation=2)), random_input(2, 4, 8, 8))
    assert "is dilated" in kept_reason(result) and graph_ops(result, "aten.add") == 2


def test_refused_branch_not_centred():
    """9x9 input, stride 3: the 5x5 (padding 2) and the 3x3 (padding 0) both give 3x3 outputs, but
    the 3x3 reads the lower-right part of each 5x5 window."""
    block = Block(
        [dict(kernel_size=5, stride=3, padding=2), dict(kernel_size=3, stride=3)],
        pool=dict(kernel_size=3, stride=3, padding=1),
    )
    assert_refused(with_statistics(block), random_input(2, 4, 9, 9).double(), "is not centred")


class SharedBranch(Block):
    def forward(self, x):
        side = self.convs[1](x)
        return self.convs[0](x) + side + self.identity(x), side


def test_a_branch_read_elsewhere_blocks_the_merge():
    block = SharedBranch([dict(kernel_size=3, padding=1), dict(kernel_size=1)], identity=True)
    result = assert_fold_exact(with_statistics(block), random_input(2, 4, 8, 8))
    assert "also used elsewhere" in kept_reason(result)


# ------------------------------------------------------------------------------ ONNX layer
def test_onnx_export_of_a_merged_block(tmp_path):
    model = with_statistics(nn.Sequential(rep_block(4, 4, pool=True), nn.Conv2d(4, 2, 1)))
    assert_onnx_matches(model, random_input(2, 4, 8, 8), tmp_path / "model.onnx")
    assert onnx_ops(tmp_path / "model.onnx", "Conv") == 2 and onnx_ops(tmp_path / "model.onnx", "Add") == 0


# ------------------------------------------------- the block input, in place writes, dtypes


class OnAConvOutput(nn.Module):
    """A RepVGG block whose input is itself a conv's output: stem → (3x3 + 1x1 + identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block([{"kernel_size": 3, "padding": 1}, {"kernel_size": 1}], identity=True)

    def forward(self, x):
        return self.block(self.stem(x))


def test_a_block_whose_input_is_a_conv_output_is_still_merged():
    result = assert_fold_exact(with_statistics(OnAConvOutput()), random_input(2, 3, 6, 7))
    assert graph_ops(result, "conv") == 2 and graph_ops(result, "add") == 0


class WrittenBetweenBranches(nn.Module):
    """``a = conv_a(y); y.mul_(2); b = conv_b(y)``: the branches read different values of ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.stem(x)
        a = self.a(y)
        y[:, :2].mul_(2.0)
        return a + self.b(y)


def test_kept_block_whose_input_is_written_in_place_between_its_branches(monkeypatch):
    model = with_statistics(WrittenBetweenBranches())
    result = assert_fold_exact(model, random_input(2, 3, 5, 5))
    assert graph_ops(result, "conv") == 3  # the stem and both branches: no merge
    from bnfold.folding import fold
    from bnfold.folding.rules import multibranch

    monkeypatch.setattr(multibranch, "mutated", lambda node: False)

    result = fold(model.double(), (random_input(2, 3, 5, 5).double(),))
    assert result.proof.undone == ["the branches merged into Conv2d 'a.0'"]
    assert graph_ops(result, "conv") == 3


class ScaledInFloat64(nn.Module):
    """``x + gamma·(conv(x) - bn(x))`` with a float64 layer scale in a float32 model: the sum is
    float64, a merged conv would be float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.norm = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.rand(4, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return x + self.gamma * (self.conv(x) - self.norm(x))


def test_a_layer_scale_of_another_dtype_is_no_merge_and_the_output_keeps_its_dtype():
    from bnfold.folding import fold

    model, x = with_statistics(ScaledInFloat64()).float(), random_input(2, 4, 5, 5)
    model.gamma.data = model.gamma.data.double()
    result = fold(model, (x,))
    assert run(result.module, x)[0].dtype == run(model, x)[0].dtype == torch.float64
    assert graph_ops(result, "add") >= 1


# ------------------------------------------------- each geometry guard, on both sides


GEOMETRY = {
    # (the block, input size, merged?): strided convs that dilate differently, or pool branches
    # whose windows sit elsewhere, give outputs of the same shape but of other positions.
    "dilated along one axis": (
        lambda: Block(
            [dict(kernel_size=3, stride=3, padding=1), dict(kernel_size=3, stride=3, padding=1, dilation=(2, 1))]
        ),
        9,
        False,
    ),
    "stride-2 MobileOne with a pool branch": (lambda: rep_block(4, 4, stride=2, identity=False, pool=True), 8, True),
    "a pool of another stride": (
        lambda: Block([dict(kernel_size=3, stride=2, padding=1)], pool=dict(kernel_size=3, stride=3, padding=1)),
        4,
        False,
    ),
}


@pytest.mark.parametrize("name", GEOMETRY)
def test_a_block_merges_exactly_when_its_branches_sample_the_same_positions(name):
    make, size, merged = GEOMETRY[name]
    result = assert_fold_exact(with_statistics(make()), random_input(2, 4, size, size))
    assert (graph_ops(result, "aten.add") == 0) == merged, result.report


class SumIntoARead(nn.Module):
    """``a = conv3x3(x); r = relu(a); a += conv1x1(x)``: the in-place sum changes a tensor that
    ``r`` already read, so it cannot become one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.a(x)
        r = torch.relu(a)
        a += self.b(x)
        return a, r


def test_an_in_place_sum_into_a_tensor_other_ops_read_is_no_block():
    result = assert_fold_exact(SumIntoARead().eval(), random_input(2, 4, 5, 5), [])
    assert graph_ops(result, "aten.conv") == 2
