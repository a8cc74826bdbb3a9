"""The click app: the main job, inspect and verify, and every user error as one stderr line,
a non-zero exit code, no traceback and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold.cli.main import main
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
DIGITS = SAMPLES / "digits_cnn" / "model.pt"
MOBILENET = SAMPLES / "shapes_mobilenet" / "model.pt"
SEGNET = SAMPLES / "shapes_segnet" / "model.pt"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_prints_the_report_and_writes_json(tmp_path):
    out, report = tmp_path / "digits.onnx", tmp_path / "report.json"
    result = invoke("export", DIGITS, "-o", out, "--report", report, "--inputs", SAMPLES / "digits_cnn" / "test.npz")
    assert result.exit_code == 0, result.stderr
    assert "4 folded, 0 kept" in result.stdout and "Verification PASSED" in result.stdout
    assert out.is_file()
    data = json.loads(report.read_text())
    assert data["fold"]["folded"] == 4 and data["verify"]["passed"] is True
    assert data["verify"]["outputs"][0]["max_rel_error"] < data["verify"]["rtol"]
    assert result.stderr == ""  # no progress when not on a terminal


def test_export_defaults_to_the_model_stem_beside_it(tmp_path):
    model = tmp_path / "net.pt"
    shutil.copy(DIGITS, model)
    assert invoke("export", model).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.pt"]


def test_export_state_dict_with_arch_and_kwargs(tmp_path):
    result = invoke(
        "export",
        MOBILENET,
        "-o",
        tmp_path / "m.onnx",
        "--arch",
        "sample_models.architectures:mobilenet_tiny",
        "--arch-kwargs",
        '{"num_classes": 4}',
        "--static-batch",
    )
    assert result.exit_code == 0, result.stderr
    assert "static batch" in result.stdout


def test_inspect_lists_every_batchnorm(tmp_path):
    result = invoke("inspect", SEGNET, "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    assert "4 batch-norm(s): 4 folded" in result.stdout and "decoder.1" in result.stdout
    data = json.loads(invoke("inspect", SEGNET, "--trust-pickle", "--json").stdout)
    assert data["folded"] == 4 and data["input_shapes"] == [[1, 3, 16, 16]]


def test_verify_command(tmp_path):
    out = tmp_path / "d.onnx"
    assert invoke("export", DIGITS, "-o", out, "--no-verify").exit_code == 0
    result = invoke("verify", DIGITS, out)
    assert result.exit_code == 0 and "PASSED" in result.stdout


def _state_dict_file(tmp_path: Path) -> Path:
    from sample_models.architectures import digits_cnn

    torch.save(digits_cnn().state_dict(), tmp_path / "sd.pt")
    return tmp_path / "sd.pt"


ERRORS = {
    "missing-file": (lambda t: ["export", t / "nope.pt"], 3, "does not exist"),
    "not-a-model": (
        lambda t: ["export", (t / "notes.txt", (t / "notes.txt").write_text("hello"))[0]],
        3,
        "not a PyTorch model",
    ),
    "pickle-untrusted": (lambda t: ["export", SEGNET, "-o", t / "s.onnx"], 3, "--trust-pickle"),
    "state-dict-no-arch": (lambda t: ["export", _state_dict_file(t)], 2, "--arch"),
    "bad-input-shape": (lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--input-shape", "1x1x8"], 3, ""),
    "malformed-input-shape": (
        lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--input-shape", "1xfoo"],
        2,
        "--input-shape",
    ),
    "missing-output-folder": (lambda t: ["export", DIGITS, "-o", t / "no" / "d.onnx"], 2, "does not exist"),
    "bad-arch-kwargs": (
        lambda t: [
            "export",
            _state_dict_file(t),
            "--arch",
            "sample_models.architectures:digits_cnn",
            "--arch-kwargs",
            "{bad",
        ],
        2,
        "--arch-kwargs",
    ),
    "inspect-missing": (lambda t: ["inspect", t / "nope.pt"], 3, "does not exist"),
    "verify-missing-onnx": (lambda t: ["verify", DIGITS, t / "nope.onnx"], 3, "does not exist"),
    "unsupported-opset": (lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--opset", "7"], 2, "--opset 7"),
    "negative-rtol": (lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--no-verify", "--rtol", "-1"], 2, "--rtol"),
    "keep-io-types-without-fp16": (
        lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--keep-io-types"],
        2,
        "--keep-io-types",
    ),
    "empty-inputs": (
        lambda t: [
            "export",
            DIGITS,
            "-o",
            t / "d.onnx",
            "--inputs",
            (t / "e.npy", np.save(t / "e.npy", np.zeros((0, 1, 8, 8), np.float32)))[0],
        ],
        2,
        "no samples",
    ),
    "report-folder-missing": (
        lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--report", t / "no" / "r.json"],
        2,
        "--report",
    ),
    "verify-report-folder-missing": (
        lambda t: ["verify", DIGITS, t / "nope.onnx", "--report", t / "no" / "r.json"],
        2,
        "--report",
    ),
    "bad-preprocess-size": (
        lambda t: ["export", DIGITS, "-o", t / "d.onnx", "--preprocess-size", "abc"],
        2,
        "--preprocess-size",
    ),
    "verify-other-model": (
        lambda t: ["verify", DIGITS, SAMPLES / "shapes_resnet" / "test.npz"],
        3,
        "cannot be loaded by ONNX Runtime",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_user_errors_are_one_line_with_an_exit_code_and_write_nothing(case, tmp_path):
    make_args, code, text = ERRORS[case]
    args = make_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(*args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(tmp_path.rglob("*")) == before


def test_debug_shows_the_exception():
    result = CliRunner().invoke(main, ["--debug", "export", "nope.pt"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "ModelLoadError"


def test_no_top_level_cli_package_is_installed(tmp_path):
    code = "import importlib.util, bnfold.cli.main; print(importlib.util.find_spec('cli'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
