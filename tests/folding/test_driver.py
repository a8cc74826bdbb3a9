"""The fold driver: every batch-norm gets an entry (folded into which layer, or kept and why, with
a category), batch statistics are never folded, statistics are checked, chains of folds compose."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fold_checks import (
    assert_fold_exact,
    assert_wrong,
    float64_copy,
    fold_checked,
    kept_reason,
    run,
    with_statistics,
)
from helpers import random_input
from torch import nn

from bnfold import FoldError
from bnfold.folding import fold
from bnfold.folding import math as fold_math


# ------------------------------------------------------------------------- batch statistics
def test_track_running_stats_false_is_kept():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    result = fold_checked(model, random_input(4, 3, 6, 6), ["kept"])
    assert "batch statistics" in kept_reason(result)
    assert result.report.kept_by_reason() == {"uses batch statistics at inference": 1}


class TrainingFunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean.clone(), self.var.clone(), training=True)


def test_kept_functional_bn_called_with_training_true():
    model = TrainingFunctionalBN().eval()
    x = random_input(2, 3, 6, 6).double()
    assert "training=True" in kept_reason(assert_fold_exact(model, x, ["kept"]))
    # Folded anyway with its running statistics, it would not normalise by the batch's.
    m = float64_copy(model)
    s, t = fold_math.bn_scale_shift(m.mean, m.var, None, None, 1e-5)
    w, b = fold_math.scale_output_channels(m.conv.weight, m.conv.bias, s, t)
    assert_wrong(run(m, x)[0], F.conv2d(x, w, b))


# ------------------------------------------------------------------------------ kept reasons
def test_activation_between_conv_and_bn_is_kept():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    assert "'relu'" in kept_reason(fold_checked(model, random_input(2, 3, 6, 6), ["kept"]))


def test_batchnorm_on_model_input_feeding_no_weight_layer_is_kept():
    """(Before a flatten and a Linear it folds: tests/folding/rules/test_through_ops.py.)"""
    model = with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)))
    assert "model input" in kept_reason(fold_checked(model, random_input(2, 3, 3, 3), ["kept"]))


def test_kept_batchnorms_are_grouped_by_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())
    result = fold_checked(with_statistics(model), random_input(2, 3, 4, 4), ["kept", "kept"])
    assert result.report.kept_by_reason() == {"after relu": 2}
    assert "kept, by reason: after relu: 2" in str(result.report)


class KeptForFourReasons(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_input = nn.BatchNorm2d(3)  # then a zero-padded conv: on a model input
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(4)  # the conv output is also added: used elsewhere
        self.bn_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.bn_relu = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(self.bn_input(x))
        return self.bn_relu(torch.relu(self.bn_stats(self.bn_shared(y) + y)))


def test_every_kept_batchnorm_gets_a_category_without_layer_names():
    result = assert_fold_exact(with_statistics(KeptForFourReasons()), random_input(4, 3, 5, 5), ["kept"] * 4)
    assert result.report.kept_by_reason() == {
        "on a model input": 1,
        "after a Conv whose output is also used elsewhere": 1,
        "uses batch statistics at inference": 1,
        "after relu": 1,
    }


# ------------------------------------------------------------------------------------ chains
def test_chain_conv_bn_bn():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    result = fold_checked(model, random_input(2, 3, 7, 7), ["folded", "folded"])
    assert {e.into for e in result.report.entries} == {"0"}


def test_a_stack_of_conv_bn_pairs_with_different_eps():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )
    result = fold_checked(with_statistics(model), random_input(2, 3, 6, 6), ["folded"] * 3)
    assert [e.into for e in result.report.entries] == ["0", "3", "7"]


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
def test_bn_after_add_concat_pool_activation_folds_into_the_following_conv(producer):
    result = fold_checked(with_statistics(AfterProducer(producer)), random_input(2, 3, 6, 6), ["folded"])
    (entry,) = result.report.entries
    if producer == "cat":  # folded on the output side, one slice into each conv
        assert entry.into == "a, b"
    else:
        assert entry.into == "conv" and "input side" in entry.pattern


# ---------------------------------------------------------------------------------- errors
def _bn_model() -> nn.Module:
    return with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.parametrize(
    "buffer, value", [("running_mean", float("nan")), ("running_var", float("inf")), ("running_var", -0.5)]
)
def test_corrupt_statistics_are_an_error_naming_the_layer(buffer, value):
    model = _bn_model()
    getattr(model[1], buffer)[2] = value
    with pytest.raises(FoldError, match=r"batch-norm '1'.*" + buffer):
        fold(model, (random_input(2, 3, 6, 6),))


def test_fp16_overflow_is_an_error_naming_the_layers():
    model = _bn_model()
    model[1].running_var.fill_(1e-9)
    model[1].eps = 1e-12
    model[1].weight.data.fill_(1e3)
    model = model.half()
    with pytest.raises(FoldError, match=r"batch-norm '1' into Conv2d '0'.*float16"):
        fold(model, (random_input(2, 3, 6, 6).half(),))


# ------------------------------------------------------------- instance norms, stored tensors


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), norm

    def forward(self, x):
        return self.norm(self.conv(x))


def _with_running_stats(norm: nn.InstanceNorm2d) -> nn.InstanceNorm2d:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(4, generator=gen))
        norm.running_var.copy_(torch.rand(4, generator=gen) + 0.2)
        if norm.affine:
            norm.weight.copy_(torch.randn(4, generator=gen))
            norm.bias.copy_(torch.randn(4, generator=gen))
    return norm


@pytest.mark.parametrize("affine", [True, False])
def test_an_eval_instance_norm_with_running_stats_folds_like_a_batchnorm_and_exports(affine, tmp_path):
    from fold_checks import assert_onnx_matches

    norm = _with_running_stats(nn.InstanceNorm2d(4, affine=affine, track_running_stats=True))
    model = ConvNorm(norm).eval()
    result = assert_fold_exact(model, random_input(2, 3, 6, 6), ["folded"])
    assert result.report.entries[0].kind == "InstanceNorm2d"
    assert_onnx_matches(model, random_input(2, 3, 6, 6), tmp_path / "m.onnx")


def test_an_instance_norm_of_each_sample_is_no_batchnorm_and_exports(tmp_path):
    from fold_checks import assert_onnx_matches

    model = ConvNorm(nn.InstanceNorm2d(4, affine=True)).eval()
    assert fold(model, (random_input(2, 3, 6, 6),)).report.entries == []
    assert_onnx_matches(model, random_input(2, 3, 6, 6), tmp_path / "m.onnx")


class NormalisedConstant(nn.Module):
    """A batch-norm of a learned positional map, added to the features or gated."""

    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pos = nn.Parameter(torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        pos = self.bn(self.pos)
        return self.conv(x) * torch.sigmoid(pos) if self.gated else self.conv(x) + pos


@pytest.mark.parametrize("gated", [False, True], ids=["added", "gated"])
def test_a_batchnorm_of_a_stored_tensor_is_computed_once_and_in_the_report(gated):
    result = assert_fold_exact(with_statistics(NormalisedConstant(gated)), random_input(2, 3, 5, 5), ["folded"])
    (entry,) = result.report.entries
    assert entry.into == "a stored constant" and entry.name == "bn"


def test_a_zero_running_var_with_eps_0_is_an_error_naming_the_layer():
    model = _bn_model()
    model[1].eps = 0.0
    model[1].running_var[1] = 0.0
    with pytest.raises(FoldError, match=r"batch-norm '1' has 1 zero running_var value\(s\) with eps=0"):
        fold(model, (random_input(2, 3, 6, 6),))


class WritesItsState(nn.Module):
    """A counter incremented in forward, and batch statistics updated at test time after use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        y = self.bn(self.conv(x))
        with torch.no_grad():
            self.bn.running_mean.mul_(0.9)
        return y


def test_running_the_folded_module_never_writes_to_the_users_model():
    model = with_statistics(WritesItsState())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold(model, (random_input(2, 3, 6, 6),)).module
    for _ in range(2):
        folded(random_input(2, 3, 6, 6))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.cond(y.sum() > 0, lambda t: self.bn(t), lambda t: self.bn2(t) * 2, (y,))


def test_batchnorms_inside_control_flow_branches_are_reported_kept_and_export(tmp_path):
    from bnfold import export

    model = with_statistics(Branches())
    result = fold(model, (random_input(2, 3, 5, 5),))
    assert [(e.status, e.category) for e in result.report.entries] == [("kept", "inside a control-flow branch")] * 2
    assert export(model, (random_input(2, 3, 5, 5),), tmp_path / "m.onnx").verify_report.passed


class WrittenThroughAView(nn.Module):
    """``h[:, :2].mul_(0)`` after the BN read ``h``: the write goes through a slice view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.conv = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.conv(self.bn(h))
        h[:, :2].mul_(0.0)
        return y + h


def test_an_input_written_through_a_view_after_the_batchnorm_is_not_read_instead():
    result = assert_fold_exact(with_statistics(WrittenThroughAView()), random_input(2, 3, 5, 5), ["kept"])
    assert "changed in place" in kept_reason(result)


class ComputedBias(nn.Module):
    """A conv whose weight and bias are both computed from stored tensors (as parametrizations do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        return self.bn(F.conv2d(x, self.conv.weight * self.gain, self.conv.bias * self.gain))


def test_a_conv_with_a_computed_bias_folds():
    assert_fold_exact(with_statistics(ComputedBias()), random_input(2, 3, 6, 6), ["folded"])


class SavedStatistics(nn.Module):
    """``native_batch_norm`` whose saved mean and invstd are returned too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        b = self.bn
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            self.conv(x), b.weight, b.bias, b.running_mean, b.running_var, False, 0.1, b.eps
        )
        return out, mean, invstd


def test_kept_when_the_saved_statistics_outputs_are_used():
    model, x = with_statistics(SavedStatistics()), random_input(2, 3, 5, 5)
    result = fold(model, (x,))
    assert [e.status for e in result.report.entries] == ["kept"]
    assert "saved mean/invstd" in kept_reason(result)
    for r, g in zip(run(model, x), run(result.module, x), strict=True):
        assert torch.equal(r, g) or torch.allclose(r, g, rtol=1e-5, atol=1e-6)


def test_a_decomposed_core_aten_program_folds_its_batchnorms():
    """``run_decompositions()`` turns batch-norms into ``_native_batch_norm_legit_no_training``,
    whose unused saved statistics stay in the graph as getitems nobody reads."""
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)))
    model.append(nn.BatchNorm2d(5))
    model = with_statistics(model)
    x = random_input(2, 3, 6, 6)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in ops
    assert_fold_exact(program.module(), x, ["folded", "folded"])


def test_a_negative_running_var_is_named_as_such():
    model = _bn_model()
    model[1].running_var[2] = -0.5
    with pytest.raises(FoldError, match=r"batch-norm '1' has 1 negative running_var value\(s\) \(min -0.5\)"):
        fold(model, (random_input(2, 3, 6, 6),))


class DecayingScale(nn.Module):
    """A per-channel scale the forward updates after reading it: state, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1, generator=torch.Generator().manual_seed(3)) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.scale
        self.scale.mul_(0.5)
        return y


def test_a_buffer_a_functional_program_declares_mutated_is_not_folded_as_a_constant():
    """In a functionalised program (``run_decompositions``, as saved ``.pt2`` files may hold) the
    update is a declared buffer mutation, not an in-place op: folding the scale's current value
    would make every later call wrong, which a proof on one call cannot see."""
    from bnfold.folding.capture import capture
    from bnfold.folding.driver import fold_program

    program = capture(DecayingScale().eval(), (random_input(2, 3, 5, 5),)).run_decompositions()
    assert "scale" in program.graph_signature.buffers_to_mutate.values()
    assert not [n for n in program.graph.nodes if str(n.target).endswith("_.Tensor")]  # no in-place op left
    folded = fold_program(program)
    assert not folded.applied and not folded.report.entries
