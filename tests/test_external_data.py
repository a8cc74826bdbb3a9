"""Models over protobuf's 2 GiB limit: written with external data, atomically (data file first,
the .onnx last), loaded by the Predictor and verified. The fast tests lower the threshold; the
slow one exports a real > 2 GiB model."""

from __future__ import annotations

import errno
import importlib
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import corrupt_output_folds, random_input, randomize_batchnorms
from hostile import ROOT, run_cli, snapshot
from torch import nn

import bnfold
from bnfold import staging
from bnfold.predictor import Predictor
from bnfold.staging import external_data_path

export_module = importlib.import_module("bnfold.exporting")


def small() -> nn.Module:
    return randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    )


@pytest.fixture
def external(monkeypatch):
    """Every model counts as large."""
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 0)


def _external_tensors(path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_large_model_is_written_with_external_data_and_runs(tmp_path, external):
    model, x = small(), random_input(4, 3, 8, 8)
    result = bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert result.verify_report.passed
    assert snapshot(tmp_path).keys() == {"m.onnx", "m.onnx.data"}
    assert _external_tensors(tmp_path / "m.onnx")  # the weights live in m.onnx.data
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(
        Predictor(tmp_path / "m.onnx", device="cpu").predict(x.numpy()), expected, rtol=1e-4, atol=1e-5
    )
    assert bnfold.verify(model, tmp_path / "m.onnx").passed


def test_small_models_stay_one_file(tmp_path):
    bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert snapshot(tmp_path).keys() == {"m.onnx"} and not _external_tensors(tmp_path / "m.onnx")


def test_the_data_file_moves_first_and_the_onnx_file_last(tmp_path, external, monkeypatch):
    moves: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording(src, dst):
        if os.path.dirname(dst) == str(tmp_path):  # moves into the target folder (not the writer's own)
            moves.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", recording)
    bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert moves == [("m.onnx.data", "m.onnx.data"), ("m.onnx", "m.onnx")]


def test_failed_verification_leaves_neither_file(tmp_path, external, monkeypatch):
    corrupt_output_folds(monkeypatch)
    with pytest.raises(bnfold.VerificationError):
        bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert snapshot(tmp_path) == {}


def test_failure_moving_the_onnx_file_removes_the_moved_data_file(tmp_path, external, monkeypatch):
    real_replace = os.replace

    def fails_on_onnx(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", fails_on_onnx)
    with pytest.raises(bnfold.errors.OutputError, match="No space left"):
        bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # no data file, no temporary folder


def test_failure_moving_the_data_file_leaves_nothing(tmp_path, external, monkeypatch):
    real_replace = os.replace
    attempts = []

    def fails_on_data(src, dst):
        if Path(dst) == tmp_path / "m.onnx.data":
            attempts.append(dst)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", fails_on_data)
    with pytest.raises(bnfold.errors.OutputError, match="Input/output error"):
        bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert attempts and list(tmp_path.iterdir()) == []


def test_a_temporary_folder_that_cannot_be_created_is_an_output_error(tmp_path, external, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(staging.tempfile, "mkdtemp", read_only)
    with pytest.raises(bnfold.errors.OutputError, match=r"m\.onnx: Read-only file system; nothing was written"):
        bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_data_file_never_overwrites_the_input(tmp_path, external):
    source = tmp_path / "m.onnx.data"
    source.write_bytes(b"the user's model")
    with pytest.raises(bnfold.UsageError, match="would overwrite the input"):
        bnfold.export(small(), (random_input(1, 3, 8, 8),), tmp_path / "m.onnx", source=source)
    assert snapshot(tmp_path).keys() == {"m.onnx.data"} and source.read_bytes() == b"the user's model"


def test_cli_export_verify_and_predict_with_external_data(tmp_path, external, monkeypatch):
    monkeypatch.chdir(ROOT)
    digits = ROOT / "sample_models" / "digits_cnn"
    out = tmp_path / "d.onnx"
    assert run_cli("export", digits / "model.pt", "-o", out).exit_code == 0
    assert external_data_path(out).is_file()
    assert run_cli("verify", digits / "model.pt", out, "--inputs", digits / "test.npz").exit_code == 0
    predicted = run_cli("predict", out, digits / "test.npz", "--json")
    assert predicted.exit_code == 0 and len(predicted.stdout.splitlines()) == 360


@pytest.mark.slow
def test_a_model_over_2_gib(tmp_path):
    """A synthetic wide CNN (2.46 GB of float32 weights): exported with external data, loaded by
    the Predictor, verified. Measured: see the README ("Robustness and security")."""
    width = 300_000
    torch.manual_seed(0)
    with torch.no_grad():
        model = nn.Sequential(
            nn.Conv2d(4, 1024, 1),
            nn.BatchNorm2d(1024),
            nn.Flatten(),
            nn.Linear(1024, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
        randomize_batchnorms(model)
    start = time.perf_counter()
    result = bnfold.export(model, (torch.randn(1, 4, 1, 1),), tmp_path / "wide.onnx")
    seconds = time.perf_counter() - start
    sizes = snapshot(tmp_path)
    assert result.verify_report.passed and result.fold_report.folded_count == 3
    assert sizes["wide.onnx"] < 1_000_000 and sizes["wide.onnx.data"] > 2 * 2**30
    x = np.random.default_rng(0).standard_normal((3, 4, 1, 1)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = Predictor(tmp_path / "wide.onnx", device="cpu").predict(x)
    assert np.abs(got - expected).max() <= 1e-5 + 1e-4 * np.abs(expected).max()
    print(
        f"\n>2 GiB export: {sizes['wide.onnx.data'] / 2**30:.2f} GiB data + {sizes['wide.onnx']} B graph, "
        f"export+verify {seconds:.0f} s, max rel err {result.verify_report.outputs[0].max_rel_error:.2e}"
    )
