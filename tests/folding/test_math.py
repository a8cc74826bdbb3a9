"""Property-based tests of the fold math against float64 conv/linear + batch-norm references, and of
the kernel arithmetic that merges multi-branch blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.folding import math as fold_math

F64 = torch.float64
# Float64 end to end: anything above re-association noise is a wrong formula.
RTOL = 1e-10


def bn_params(draw, channels: int, affine: bool):
    """Valid but extreme statistics: variances from 1e-6 to 1e4, means up to 1e3."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    log_var = torch.empty(channels, dtype=F64).uniform_(-6, 4, generator=gen)
    mean = torch.empty(channels, dtype=F64).uniform_(-1, 1, generator=gen) * 10 ** draw(st.integers(0, 3))
    gamma = torch.randn(channels, dtype=F64, generator=gen) if affine else None
    beta = torch.randn(channels, dtype=F64, generator=gen) if affine else None
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return mean, 10**log_var, gamma, beta, eps, gen


def reference_bn(y, mean, var, gamma, beta, eps):
    return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=eps)


def assert_close(got, ref):
    scale = ref.abs().max().item() + 1e-30
    assert (got - ref).abs().max().item() <= RTOL * scale


@st.composite
def conv_case(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    return dict(
        dims=dims,
        groups=groups,
        cin=cin,
        cout=cout,
        k=k,
        stride=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 2)),
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        bn=None,
    ), draw


def layer_tensors(c: dict, gen: torch.Generator, transposed: bool, size: int):
    """The functional op, weight, bias (or None) and a batch-2 input of side ``size`` for conv case ``c``."""
    dims, kernel = c["dims"], [c["k"]] * c["dims"]
    if transposed:
        op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        shape = (c["cin"], c["cout"] // c["groups"], *kernel)
    else:
        op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        shape = (c["cout"], c["cin"] // c["groups"], *kernel)
    w = torch.randn(*shape, dtype=F64, generator=gen)
    b = torch.randn(c["cout"], dtype=F64, generator=gen) if c["bias"] else None
    x = torch.randn(2, c["cin"], *[size] * dims, dtype=F64, generator=gen)
    return op, w, b, x


@settings(max_examples=60, deadline=None)
@given(conv_case())
def test_conv_output_fold(case):
    c, draw = case
    mean, var, gamma, beta, eps, gen = bn_params(draw, c["cout"], c["affine"])
    conv, w, b, x = layer_tensors(c, gen, transposed=False, size=7)
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    w2, b2 = fold_math.scale_output_channels(w, b, s, t)
    assert_close(conv(x, w2, b2, **kw), reference_bn(conv(x, w, b, **kw), mean, var, gamma, beta, eps))


@settings(max_examples=60, deadline=None)
@given(conv_case())
def test_conv_transpose_output_fold(case):
    c, draw = case
    mean, var, gamma, beta, eps, gen = bn_params(draw, c["cout"], c["affine"])
    deconv, w, b, x = layer_tensors(c, gen, transposed=True, size=5)
    kw = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    w2, b2 = fold_math.scale_transposed_output_channels(w, b, s, t, c["groups"])
    assert_close(deconv(x, w2, b2, **kw), reference_bn(deconv(x, w, b, **kw), mean, var, gamma, beta, eps))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.booleans(), st.booleans(), st.data())
def test_linear_output_fold(n_in, n_out, bias, affine, data):
    mean, var, gamma, beta, eps, gen = bn_params(data.draw, n_out, affine)
    w = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    b = torch.randn(n_out, dtype=F64, generator=gen) if bias else None
    x = torch.randn(4, n_in, dtype=F64, generator=gen)
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    w2, b2 = fold_math.scale_output_channels(w, b, s, t)
    assert_close(F.linear(x, w2, b2), reference_bn(F.linear(x, w, b), mean, var, gamma, beta, eps))


def test_scale_shift_is_float64_even_for_float32_statistics():
    s, t = fold_math.bn_scale_shift(torch.ones(3), torch.full((3,), 1e-8), None, None, 0.0)
    assert s.dtype == t.dtype == F64
    assert torch.allclose(s, torch.full((3,), 1e4, dtype=F64), rtol=1e-7)


PAD_MODES = ["zeros-unpadded", "reflect", "replicate", "circular"]


@settings(max_examples=60, deadline=None)
@given(conv_case(), st.sampled_from(PAD_MODES))
def test_conv_input_fold(case, pad_mode):
    """conv(pad(s*x + t)) == conv'(pad(x)) for affine-commuting pads (and no padding)."""
    c, draw = case
    mean, var, gamma, beta, eps, gen = bn_params(draw, c["cin"], c["affine"])
    conv, w, b, x = layer_tensors(c, gen, transposed=False, size=7)
    p = c["padding"]
    pad = (
        (lambda y: y)
        if pad_mode == "zeros-unpadded" or p == 0
        else (lambda y: F.pad(y, [p] * 2 * c["dims"], mode=pad_mode))
    )
    kw = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    w2, b2 = fold_math.scale_input_channels(w, b, s, t, c["groups"])
    assert_close(conv(pad(x), w2, b2, **kw), conv(pad(reference_bn(x, mean, var, gamma, beta, eps)), w, b, **kw))


@settings(max_examples=40, deadline=None)
@given(conv_case())
def test_conv_transpose_input_fold_with_zero_shift(case):
    c, draw = case
    _, var, gamma, _, eps, gen = bn_params(draw, c["cin"], True)
    mean, beta = torch.zeros(c["cin"], dtype=F64), torch.zeros(c["cin"], dtype=F64)
    deconv, w, b, x = layer_tensors(c, gen, transposed=True, size=5)
    kw = dict(stride=c["stride"], dilation=c["dilation"], groups=c["groups"])
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    assert (t == 0).all()
    w2, b2 = fold_math.scale_transposed_input_channels(w, b, s)
    assert_close(deconv(x, w2, b2, **kw), deconv(reference_bn(x, mean, var, gamma, beta, eps), w, b, **kw))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.booleans(), st.booleans(), st.data())
def test_linear_input_fold(n_in, n_out, bias, affine, data):
    mean, var, gamma, beta, eps, gen = bn_params(data.draw, n_in, affine)
    w = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    b = torch.randn(n_out, dtype=F64, generator=gen) if bias else None
    x = torch.randn(4, n_in, dtype=F64, generator=gen)
    s, t = fold_math.bn_scale_shift(mean, var, gamma, beta, eps)
    w2, b2 = fold_math.scale_input_channels(w, b, s, t)
    assert_close(F.linear(x, w2, b2), F.linear(reference_bn(x, mean, var, gamma, beta, eps), w, b))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.booleans(), st.booleans(), st.data())
def test_batchnorm_composition(channels, affine1, affine2, data):
    m1, v1, g1, b1, e1, gen = bn_params(data.draw, channels, affine1)
    m2, v2, g2, b2, e2, _ = bn_params(data.draw, channels, affine2)
    x = torch.randn(3, channels, 4, dtype=F64, generator=gen)
    s, t = fold_math.compose_affine(
        *fold_math.bn_scale_shift(m1, v1, g1, b1, e1), *fold_math.bn_scale_shift(m2, v2, g2, b2, e2)
    )
    gamma, beta, mean = fold_math.batchnorm_params_for(s, t, v2, e2)
    expected = reference_bn(reference_bn(x, m1, v1, g1, b1, e1), m2, v2, g2, b2, e2)
    assert_close(reference_bn(x, mean, v2, gamma, beta, e2), expected)


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
    assert (got - expected).abs().max() <= RTOL * expected.abs().max()
