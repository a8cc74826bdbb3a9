"""The verifier must catch a wrong fold, with exit code 1 and no file under the target name."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner
from helpers import random_input, randomize_batchnorms
from hostile import DIGITS, run_cli
from torch import nn

import bnfold
from bnfold.folding import math as fold_math


def small_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=0.1), nn.Flatten(), nn.Linear(8 * 16, 5))
    return randomize_batchnorms(model)


def drop_eps(mean, var, weight, bias, eps):
    return original_scale_shift(mean, var, weight, bias, 0.0)


def misscale_channel(mean, var, weight, bias, eps):
    s, t = original_scale_shift(mean, var, weight, bias, eps)
    s = s.clone()
    s[s.abs().argmax()] *= 1.01
    return s, t


original_scale_shift = fold_math.bn_scale_shift


@pytest.mark.parametrize("broken", [drop_eps, misscale_channel], ids=["eps-dropped", "channel-misscaled"])
def test_a_wrong_fold_is_undone_by_the_float64_proof_and_the_export_passes(broken, tmp_path, monkeypatch):
    monkeypatch.setattr(fold_math, "bn_scale_shift", broken)
    result = bnfold.export(small_model(), (random_input(1, 3, 6, 6),), tmp_path / "model.onnx")
    (entry,) = result.fold_report.entries
    assert entry.status == "kept" and entry.reason.startswith("float64 proof failed"), entry
    assert result.verify_report.passed


def corrupt_after_the_proof(monkeypatch, how: str) -> None:
    """A bug after the float64 proof (in the final cast): the folded weight's first channel 1%
    off, or its bias shifted by 5% of its scale."""
    from bnfold.folding.store import TensorStore

    real = TensorStore.finalize

    def wrong(self):
        targets = [t for t in self.pending if t.endswith("_" + how)]
        real(self)
        for target in targets:
            value = self.program.constants[target]
            if how == "weight":
                value[0] *= 1.01
            else:
                value += 0.05 * float(value.abs().max())

    monkeypatch.setattr(TensorStore, "finalize", wrong)


@pytest.mark.parametrize("how", ["weight", "bias"], ids=["channel-misscaled", "bias-shifted"])
def test_a_fold_corrupted_after_the_proof_fails_verification_and_writes_nothing(how, tmp_path, monkeypatch):
    corrupt_after_the_proof(monkeypatch, how)
    target = tmp_path / "model.onnx"
    with pytest.raises(bnfold.VerificationError) as info:
        bnfold.export(small_model(), (random_input(1, 3, 6, 6),), target)
    assert not info.value.report.passed
    assert info.value.report.outputs[0].max_abs_error > info.value.report.outputs[0].tolerance
    assert list(tmp_path.iterdir()) == []


def test_wrong_fold_exits_1_from_the_cli(tmp_path, monkeypatch):
    model_file = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(small_model(), random_input(2, 3, 6, 6)), str(model_file))
    corrupt_after_the_proof(monkeypatch, "weight")
    result = CliRunner().invoke(main, ["export", str(model_file), "--input-shape", "1x3x6x6"])
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_correct_fold_passes_with_both_batch_sizes(tmp_path):
    result = bnfold.export(small_model(), (random_input(1, 3, 6, 6),), tmp_path / "m.onnx")
    report = result.verify_report
    assert report.passed and report.batch_sizes == [1, 3]
    assert report.outputs[0].max_rel_error < report.rtol


def test_top1_disagreement_with_clear_margin_fails(tmp_path):
    """A top-1 swap on a row whose reference margin exceeds the max error fails, even when the
    numbers are within tolerance; a swap on a row with a smaller margin is allowed."""
    from bnfold.verification import _Accumulator

    ref = np.array([[1.0, 0.0, -1.0], [0.0, 0.2, 0.0]])
    flipped_clear = np.array([[0.45, 0.55, -1.0], [0.0, 0.2, 0.0]])  # error 0.55 < margin 1.0
    acc = _Accumulator("logits")
    acc.add(ref, flipped_clear)
    check = acc.check(rtol=10.0, atol=10.0)
    assert check.max_abs_error <= check.tolerance
    assert check.argmax_decidable_rows == 1 and check.argmax_mismatches == 1 and not check.passed

    flipped_close = np.array([[1.0, 0.0, -1.0], [0.25, 0.0, 0.0]])  # error 0.25 > margin 0.2
    acc = _Accumulator("logits")
    acc.add(ref, flipped_close)
    assert acc.check(rtol=10.0, atol=10.0).passed


def test_user_inputs_of_the_wrong_shape_are_a_usage_error(tmp_path):
    path = bnfold.export(small_model(), (random_input(1, 3, 6, 6),), tmp_path / "m.onnx", verify=False).path
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 7, 7), dtype=np.float32))
    with pytest.raises(bnfold.UsageError, match="shape"):
        bnfold.verify(small_model(), path, tmp_path / "bad.npy")
    np.save(tmp_path / "int.npy", np.zeros((4, 3, 6, 6), dtype=np.int64))
    with pytest.raises(bnfold.UsageError, match="dtype"):
        bnfold.verify(small_model(), path, tmp_path / "int.npy")


# --- The verifier's own strictness, on ONNX files of deliberately wrong modules ---------------
# Tolerances the tests expect verification to choose (the README's defaults).
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5
FLOAT16_RTOL = 1e-2


def small_variance_model() -> nn.Module:
    """Conv → BatchNorm2d (default eps 1e-5) → ReLU → Linear, with running variances 5e-4..2e-3
    matched by the conv's output scale, as in trained networks: where a dropped eps shows least."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight.mul_(0.1)  # output variance ~3e-3 on standard-normal input
        bn.running_var.copy_(torch.rand(8, generator=gen) * 1.5e-3 + 5e-4)
        bn.running_mean.copy_(torch.randn(8, generator=gen) * 0.02)
        bn.weight.copy_(torch.rand(8, generator=gen) * 0.5 + 0.75)
        bn.bias.copy_(torch.randn(8, generator=gen) * 0.1)
    return model.eval()


def without_eps(model: nn.Module) -> nn.Module:
    wrong = copy.deepcopy(model)
    wrong[1].eps = 0.0
    return wrong


def one_channel_misscaled(model: nn.Module) -> nn.Module:
    """The channel with the largest batch-norm scale, 1% off."""
    wrong = copy.deepcopy(model)
    bn = wrong[1]
    with torch.no_grad():
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        bn.weight[scale.abs().argmax()] *= 1.01
    return wrong


def torch_onnx(module: nn.Module, example: torch.Tensor, path: Path, outputs: int = 1) -> Path:
    """``module`` exported by torch alone (not bnfold), with a dynamic batch axis."""
    names = ["output"] if outputs == 1 else [f"output_{i}" for i in range(outputs)]
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,  # the TorchScript exporter: ~50x faster than dynamo for these tiny modules
        input_names=["input"],
        output_names=names,
        dynamic_axes={name: {0: "batch"} for name in ["input", *names]},
    )
    return path


@pytest.mark.parametrize("reference", ["float32", "float64"])
@pytest.mark.parametrize("wrong", [without_eps, one_channel_misscaled], ids=["eps-dropped", "channel-1%-off"])
def test_default_tolerances_fail_a_wrong_fold_with_realistic_variances(tmp_path, wrong, reference):
    """Neither the default tolerances nor the float64 allowance let a wrong fold pass."""
    model = small_variance_model()
    path = torch_onnx(wrong(model), random_input(2, 3, 6, 6), tmp_path / "wrong.onnx")
    report = bnfold.verify(model, path, reference=reference)
    assert (report.rtol, report.atol) == (FLOAT32_RTOL, FLOAT32_ATOL)
    assert not report.passed
    assert report.outputs[0].max_abs_error > report.outputs[0].tolerance
    assert report.failures() and "max abs error" in report.failures()[0]


@pytest.mark.parametrize("reference", ["float32", "float64"])
def test_the_right_module_exported_the_same_way_passes(tmp_path, reference):
    """The control for the test above: the same model, exported the same way, without the mistake."""
    model = small_variance_model()
    path = torch_onnx(model, random_input(2, 3, 6, 6), tmp_path / "right.onnx")
    assert bnfold.verify(model, path, reference=reference).passed


def test_the_float64_allowance_is_four_times_the_float32_originals_own_error(tmp_path):
    """With a float64 reference the tolerance grows by 4 * max|y32 - y64| of the original model,
    measured here independently, and by nothing else."""
    model = small_variance_model()
    path = torch_onnx(model, random_input(2, 3, 6, 6), tmp_path / "right.onnx")
    x = random_input(16, 3, 6, 6, seed=5)
    report = bnfold.verify(model, path, x.numpy(), reference="float64")
    with torch.no_grad():
        y32, y64 = model(x).double(), copy.deepcopy(model).double()(x.double())
    expected = FLOAT32_ATOL + FLOAT32_RTOL * float(y64.abs().max()) + 4 * float((y32 - y64).abs().max())
    assert report.outputs[0].tolerance == pytest.approx(expected, rel=1e-9)


def bnfold_onnx(model: nn.Module, folder: Path, **options) -> Path:
    path = folder / "bnfold.onnx"
    bnfold.export(model, (random_input(1, 3, 6, 6),), path, verify=False, **options)
    return path


@pytest.mark.parametrize(
    ("make", "expected_rtol"),
    [
        (lambda m, t: bnfold_onnx(m, t), FLOAT32_RTOL),
        (lambda m, t: bnfold_onnx(m, t, fp16=True), FLOAT16_RTOL),
        (lambda m, t: bnfold_onnx(m, t, fp16=True, keep_io_types=True), FLOAT16_RTOL),  # float32 inputs
        (lambda m, t: torch_onnx(m, random_input(2, 3, 6, 6), t / "torch.onnx"), FLOAT32_RTOL),
        (
            lambda m, t: torch_onnx(copy.deepcopy(m).half(), random_input(2, 3, 6, 6).half(), t / "torch.onnx"),
            FLOAT16_RTOL,
        ),
    ],
    ids=["bnfold-float32", "bnfold-float16", "bnfold-float16-float32-io", "torch-float32", "torch-float16"],
)
def test_standalone_verify_picks_float16_tolerances_only_for_a_float16_model(tmp_path, make, expected_rtol):
    """The float32 module is the reference either way; the ONNX file's weights decide. bnfold's
    exports record their weight dtype; files from elsewhere are read."""
    model = small_model()
    report = bnfold.verify(model, make(model, tmp_path))
    assert report.rtol == expected_rtol and report.passed


@pytest.mark.parametrize("fp16", [False, True], ids=["float32", "float16"])
def test_bnfold_verify_on_the_command_line_picks_the_tolerances_of_the_file(tmp_path, fp16):
    loaded = bnfold.load_model(DIGITS)
    path = tmp_path / "d.onnx"
    bnfold.export(loaded.module, loaded.example_inputs(), path, fp16=fp16, keep_io_types=fp16, verify=False)
    result = run_cli("verify", DIGITS, path)
    assert result.exit_code == 0, result.stderr
    assert ("(rtol=0.01, atol=0.001)" if fp16 else "(rtol=0.0001, atol=1e-05)") in result.stdout


class TwoOutputs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.model(x)
        return y, 2 * y


class Wrapped(nn.Module):
    """``model`` with ``change`` applied to its output."""

    def __init__(self, model: nn.Module, change) -> None:
        super().__init__()
        self.model, self.change = model, change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.change(self.model(x))


def nan_in_one_column(model: nn.Module) -> nn.Module:
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[-1].bias[0] = float("nan")
    return wrong


@pytest.mark.parametrize(
    ("onnx_module", "reference_module", "message"),
    [
        (lambda m: m, TwoOutputs, "the ONNX model has 1 output(s), the PyTorch model 2"),
        (TwoOutputs, lambda m: m, "the ONNX model has 2 output(s), the PyTorch model 1"),
        (lambda m: Wrapped(m, lambda y: y.round().long()), lambda m: m, "is int64 in ONNX but torch.float32"),
        (lambda m: Wrapped(m, lambda y: y[:, :4]), lambda m: m, "has shape (3, 4) in ONNX but (3, 5) in PyTorch"),
        (nan_in_one_column, lambda m: m, "has NaN/inf in ONNX but not in PyTorch"),
    ],
    ids=["fewer-outputs", "more-outputs", "dtype", "shape", "nan"],
)
def test_structural_mismatches_and_nan_fail_with_their_message(tmp_path, onnx_module, reference_module, message):
    model = small_variance_model()
    exported = onnx_module(model)
    outputs = 2 if isinstance(exported, TwoOutputs) else 1
    path = torch_onnx(exported, random_input(2, 3, 6, 6), tmp_path / "m.onnx", outputs=outputs)
    report = bnfold.verify(reference_module(model), path)
    assert not report.passed
    assert any(message in failure for failure in report.failures()), report.failures()


@pytest.mark.parametrize(
    ("options", "parameter"),
    [({"rtol": -1.0}, "`rtol`"), ({"atol": -1.0}, "`atol`"), ({"reference": "float16"}, "`reference`")],
)
def test_bad_options_name_the_python_parameter_not_a_flag(tmp_path, options, parameter):
    with pytest.raises(bnfold.UsageError) as info:
        bnfold.verify(small_model(), tmp_path / "not-read.onnx", **options)
    assert parameter in str(info.value) and "--" not in str(info.value)


def test_bad_inputs_name_the_parameter_in_python_and_the_flag_on_the_command_line(tmp_path):
    loaded = bnfold.load_model(DIGITS)
    path = bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "d.onnx", verify=False).path
    np.save(tmp_path / "bad.npy", np.zeros((4, 1, 7, 7), dtype=np.float32))
    with pytest.raises(bnfold.UsageError, match="`inputs`") as info:
        bnfold.verify(loaded.module, path, tmp_path / "bad.npy")
    assert "--" not in str(info.value)
    result = run_cli("verify", DIGITS, path, "--inputs", tmp_path / "bad.npy")
    assert result.exit_code == 2 and "--inputs" in result.stderr and "`" not in result.stderr


# ------------------------------------------------------------------ float64 arbitration
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from float64_arbitration import ill_conditioned  # noqa: E402  (the network the README's figures measure)


@pytest.mark.parametrize("seed", range(4))
def test_a_correct_ill_conditioned_export_passes_by_float64_arbitration(tmp_path, seed):
    model = ill_conditioned(seed)
    result = bnfold.export(model, (random_input(1, 64),), tmp_path / "m.onnx")
    report = result.verify_report
    assert report.passed and report.float64_arbitration
    assert "the float32 comparison failed" in report.float64_arbitration and "passes" in report.float64_arbitration
    assert "float64 arbitration decided" in str(report)


@pytest.mark.parametrize("seed", range(4))
def test_a_corrupted_fold_of_the_same_network_still_fails_after_arbitration(tmp_path, seed):
    model = ill_conditioned(seed)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[1].weight[0] *= 1.001  # one channel 0.1% off
    path = bnfold_onnx_of(wrong, tmp_path, (random_input(1, 64),))
    report = bnfold.verify(model, path)
    assert not report.passed and "fails" in report.float64_arbitration


def test_arbitration_only_runs_when_the_float32_comparison_fails(tmp_path):
    model = small_variance_model()
    path = torch_onnx(model, random_input(2, 3, 6, 6), tmp_path / "right.onnx")
    assert bnfold.verify(model, path).float64_arbitration is None


def bnfold_onnx_of(model: nn.Module, folder: Path, example: tuple) -> Path:
    path = folder / "wrong.onnx"
    bnfold.export(model, example, path, verify=False)
    return path
