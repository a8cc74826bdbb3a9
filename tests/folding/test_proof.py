"""The float64 proof (bnfold.folding.proof): every fold is checked against the captured original in
float64; a wrong rewrite is found by bisection, undone, reported, and the rest still folds."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from fold_checks import F64, as_float64, run, with_statistics
from helpers import graph_batchnorm_ops
from torch import Tensor, nn

from bnfold import export
from bnfold.folding import fold, proof
from bnfold.folding import math as fold_math
from bnfold.folding.commuting import CHANNEL_PRESERVING
from bnfold.folding.ops import aten
from bnfold.folding.rules import through_out

# A correct fold differs from the original by float64 rounding only.
ROUNDING = 1e-13
PROOF_FAILED = "float64 proof failed"


def conv_bn_chain(blocks: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += [nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()]
    return with_statistics(nn.Sequential(*layers))


def x_input(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_a_fold_reports_its_float64_proof_in_the_report_the_json_and_the_result():
    model, x = conv_bn_chain(), x_input(1, 3, 8, 8)
    result = fold(model, (x,))
    p = result.proof
    assert p is result.report.proof
    assert (p.dtype, p.inputs, p.samples, p.bound, p.undone, p.note) == ("float64", 2, 2, proof.PROOF_RTOL, [], None)
    assert p.passed and 0 <= p.max_deviation < ROUNDING
    assert result.report.folded_count == 3
    as_json = json.loads(json.dumps(result.report.to_dict()))
    assert as_json["proof"]["dtype"] == "float64" and as_json["proof"]["inputs"] == 2
    assert "Float64 proof: the folded model matches the original on 2 inputs" in str(result.report)


def test_a_static_batch_is_proven_on_the_example_and_a_full_batch_per_probe():
    result = fold(conv_bn_chain(1), (x_input(2, 3, 8, 8),), dynamic_batch=False)
    assert (result.proof.inputs, result.proof.samples) == (2, 4)
    assert result.proof.passed


def _scale_wrongly(monkeypatch: pytest.MonkeyPatch, model: nn.Module, wrong: set[int]) -> None:
    """Seeded bug: the output-side fold scales the weights of the ``wrong`` convs (0-based) by
    ``1.01·s`` instead of ``s``."""
    original = fold_math.scale_output_channels
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    targets = {convs[i].weight.data_ptr() for i in wrong}

    def buggy(weight, bias, s, t):
        return original(weight, bias, s * 1.01 if weight.data_ptr() in targets else s, t)

    monkeypatch.setattr(fold_math, "scale_output_channels", buggy)


@pytest.mark.parametrize("wrong", [{1}, {0, 2}], ids=["one wrong rewrite", "two wrong rewrites"])
def test_a_wrong_rewrite_is_caught_undone_and_reported_and_the_rest_still_folds(monkeypatch, wrong):
    model, x = conv_bn_chain(), x_input(1, 3, 8, 8)
    _scale_wrongly(monkeypatch, model, wrong)
    result = fold(model, (x,))
    statuses = [e.status for e in result.report.entries]
    assert statuses == ["kept" if i in wrong else "folded" for i in range(3)]
    undone = [e for e in result.report.entries if e.status == "kept"]
    assert all(e.reason.startswith(PROOF_FAILED) and e.category == PROOF_FAILED for e in undone)
    assert result.proof.undone == [e.name for e in undone]
    assert result.proof.passed and result.proof.max_deviation < ROUNDING
    assert graph_batchnorm_ops(result) == len(wrong)
    for r, g in zip(run(model, x), run(result.module, x), strict=True):
        assert float((r - g).abs().max()) <= 1e-5 * float(r.abs().max())
    assert "rewrite(s) found wrong and undone" in str(result.report)


def test_export_writes_the_proven_fold_and_its_proof(monkeypatch, tmp_path):
    model, x = conv_bn_chain(), x_input(1, 3, 8, 8)
    _scale_wrongly(monkeypatch, model, {1})
    result = export(model, (x,), tmp_path / "m.onnx")
    assert result.verify_report.passed and result.onnx_batchnorm_count <= 1  # ONNX's optimizer may fuse it
    assert result.fold_report.proof.undone == [result.fold_report.entries[1].name]


def test_the_probes_reach_a_clamp_the_example_does_not(monkeypatch):
    """A seeded bug that only shows beyond a clamp: Hardtanh declared to commute with a
    per-channel map. The example never reaches the clamp; the large probe does."""
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardtanh(-50.0, 50.0), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
    x = x_input(1, 3, 6, 6)
    with torch.no_grad():
        assert float(model[0](x).abs().max()) < 50  # the example alone would not see the bug
    monkeypatch.setattr(through_out, "CHANNEL_PRESERVING", CHANNEL_PRESERVING | {aten.hardtanh.default})
    result = fold(model, (x,))
    (entry,) = result.report.entries
    assert entry.status == "kept" and entry.reason.startswith(PROOF_FAILED), entry
    assert "on the example and the probe" in entry.reason


@torch.library.custom_op("bnfold_test::float32_only", mutates_args=())
def float32_only(x: Tensor) -> Tensor:
    """An op with a float32 kernel only, as some backends' ops have."""
    if x.dtype != torch.float32:
        raise RuntimeError(f'"float32_only" not implemented for {x.dtype}')
    return x * 2


@float32_only.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class Float32Only(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return float32_only(self.bn(self.conv(x)))


def test_a_model_that_cannot_run_in_float64_is_checked_in_float32_and_says_so_loudly():
    model = with_statistics(Float32Only()).float()
    with pytest.warns(UserWarning, match="cannot run in float64"):
        result = fold(model, (x_input(1, 3, 8, 8),))
    p = result.proof
    assert p.dtype == "float32" and "cannot run in float64" in p.note and p.passed
    assert "NOT a float64 proof" in str(result.report)
    assert result.report.folded_count == 1


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + torch.rand(1)


def test_a_model_that_is_random_in_eval_mode_cannot_be_proven_and_says_why():
    from bnfold.errors import FoldError

    with pytest.raises(FoldError, match="not deterministic in eval mode"):
        fold(with_statistics(Noisy()), (x_input(1, 3, 8, 8),))


class CachesInForward(nn.Module):
    """A detection head as ultralytics writes it: an anchor grid and the input shape cached on
    the module the first time, a call log appended to."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shape = None
        self.anchors = torch.empty(0)
        self.calls: list[int] = []
        self.cache: dict[tuple, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if self.shape != x.shape:
            self.anchors = torch.arange(y.shape[-1], dtype=y.dtype) + 0.5
            self.shape = x.shape
            self.cache[tuple(x.shape[2:])] = self.anchors
        self.calls.append(1)
        return y * self.anchors


def _snapshot(model: nn.Module) -> list[dict]:
    return [
        {k: (v.clone() if isinstance(v, Tensor) else copy.copy(v)) for k, v in vars(m).items() if k != "_modules"}
        for m in model.modules()
    ]


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and type(a) is type(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_a_model_that_caches_state_in_forward_is_left_exactly_as_it_was_and_exports_twice(tmp_path):
    model, x = with_statistics(CachesInForward()), x_input(1, 3, 8, 8)
    before = _snapshot(model)
    for i in range(2):
        fold(model, (x,))
        export(model, (x,), tmp_path / f"m{i}.onnx")
    after = _snapshot(model)
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        for key in old:
            assert _same(old[key], new[key]), key


def test_the_user_model_is_not_modified_by_a_fold_in_float64():
    """A float64 model: the proof runs its own tensors as they are (no copy made by a cast), so
    nothing may write to them."""
    model = as_float64(conv_bn_chain())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fold(model, (x_input(1, 3, 8, 8).to(F64),))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_deviation_is_normwise_and_infinite_for_any_structural_difference():
    ref = torch.tensor([1.0, -4.0, math.inf, math.nan], dtype=F64)
    assert proof.deviation(ref, ref.clone()) == 0.0
    assert proof.deviation(ref, ref + torch.tensor([0.0, 1e-3, 0.0, 0.0], dtype=F64)) == pytest.approx(1e-3 / 4)
    assert proof.deviation(ref, torch.tensor([1.0, -4.0, -math.inf, math.nan], dtype=F64)) == math.inf
    assert proof.deviation(ref, torch.tensor([1.0, -4.0, math.inf, 0.0], dtype=F64)) == math.inf
    assert proof.deviation(ref, ref[:3]) == math.inf
    assert proof.deviation(torch.tensor([1, 2]), torch.tensor([1, 3])) == math.inf


class AssignsABuffer(nn.Module):
    """YOLO-style anchors: a registered buffer replaced by one of another shape on the first
    call. torch.export records that as an in-place copy into the buffer, so the captured program
    does not compute what the model does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.register_buffer("anchors", torch.zeros(1, 2, 1, 1), persistent=False)
        self.initialised = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if not self.initialised:
            self.anchors = torch.ones(1, 2, *y.shape[2:]) * 0.5
            self.initialised = True
        return y[:, :2] * self.anchors


def test_a_captured_program_that_fails_when_run_is_an_error_that_says_why():
    from bnfold.errors import FoldError

    message = "register the buffer with its final shape, or run the model once"
    with pytest.raises(FoldError, match=message):
        fold(with_statistics(AssignsABuffer()), (x_input(2, 4, 6, 6),))
