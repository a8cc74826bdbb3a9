"""Every exit code in the README's table, produced by the CLI: 0, 1, 2, 3, 4, 5 and 130 (the
last also by a real SIGINT in the middle of an export, leaving no partial file); 6 (some rows of
`bnfold predict --ray` failed) in tests/on_ray/test_ray_cli.py, which has Ray running."""

from __future__ import annotations

import errno
import importlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import corrupt_output_folds
from hostile import (
    DIGITS,
    DIGITS_ARCH,
    ROOT,
    assert_one_line_error,
    digits_state_dict,
    run_cli,
    snapshot,
    write_malicious,
)

import bnfold.loading
from bnfold import errors

README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize(("text", "heading"), [(README, "| exit code |"), (CLI_DOC, "## Exit codes")])
def test_the_docs_document_exactly_the_codes_the_cli_uses(text, heading):
    table = text.split(heading, 1)[1].split("\n\n", 2)[0 if heading.startswith("|") else 1]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    used = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert documented == used == {0, 1, 2, 3, 4, 5, 6, 130}


def test_0_success(tmp_path):
    result = run_cli("export", DIGITS, "-o", tmp_path / "d.onnx")
    assert result.exit_code == 0 and result.stderr == ""
    assert snapshot(tmp_path) == {"d.onnx": (tmp_path / "d.onnx").stat().st_size}


def test_1_verification_failed_on_export(tmp_path, monkeypatch):
    corrupt_output_folds(monkeypatch)
    result = run_cli("export", DIGITS, "-o", tmp_path / "d.onnx")
    assert_one_line_error(result, 1, "verification failed", "d.onnx was not written")
    assert "Verification FAILED" in result.stdout  # the report, on stdout
    assert snapshot(tmp_path) == {}


def test_1_verification_failed_on_verify(tmp_path):
    assert run_cli("export", DIGITS, "-o", tmp_path / "d.onnx").exit_code == 0
    torch.manual_seed(1)
    torch.save(digits_state_dict(), tmp_path / "other.pt")  # another set of weights
    result = run_cli("verify", tmp_path / "other.pt", tmp_path / "d.onnx", "--arch", DIGITS_ARCH)
    assert_one_line_error(result, 1, "verification failed")


def test_2_usage_error(tmp_path):
    assert_one_line_error(run_cli("export", DIGITS, "--input-shape", "1x-3"), 2, "--input-shape")


def test_3_unsafe_input(tmp_path):
    path = write_malicious(tmp_path / "evil.pt", tmp_path / "pwned", "legacy")
    assert_one_line_error(run_cli("export", path), 3, "posix.system", "--trust-pickle")


def test_4_internal_error(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(bnfold.loading, "load_model", bug)  # what the CLI calls
    line = assert_one_line_error(
        run_cli("export", DIGITS, "-o", tmp_path / "d.onnx"), 4, "internal error: RuntimeError: simulated bug"
    )
    assert "bnfold --debug" in line and "second line" not in line
    debug = run_cli("--debug", "export", DIGITS, "-o", tmp_path / "d.onnx")
    assert isinstance(debug.exception, RuntimeError)  # the traceback, for the bug report
    assert snapshot(tmp_path) == {}


def test_5_output_not_written(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(importlib.import_module("bnfold.onnx_writer"), "write_model", disk_full)
    assert_one_line_error(run_cli("export", DIGITS, "-o", tmp_path / "d.onnx"), 5, "No space left on device")
    assert snapshot(tmp_path) == {}


def test_5_output_not_renamed_into_place(tmp_path, monkeypatch):
    """The verified temporary file cannot be renamed onto the target: exit 5, no file left."""
    real_replace = os.replace

    def fails_onto_the_target(src, dst):
        if str(dst) == str(tmp_path / "d.onnx"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(importlib.import_module("bnfold.exporting").os, "replace", fails_onto_the_target)
    assert_one_line_error(run_cli("export", DIGITS, "-o", tmp_path / "d.onnx"), 5, "d.onnx", "Input/output error")
    assert list(tmp_path.iterdir()) == []


def test_130_interrupted_in_process(tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("bnfold.verification"), "verify", ctrl_c)  # what the CLI calls
    assert run_cli("export", DIGITS, "-o", tmp_path / "d.onnx", "--no-verify").exit_code == 0
    assert_one_line_error(run_cli("verify", DIGITS, tmp_path / "d.onnx"), 130, "interrupted")


# A bootstrap that lowers the external-data threshold, so a small model takes that path too.
EXTERNAL = "import importlib; importlib.import_module('bnfold.exporting').EXTERNAL_DATA_THRESHOLD = 0; "


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_130_sigint_during_verification_leaves_no_partial_file(tmp_path, external):
    """A real SIGINT once the temporary ONNX file (or folder) exists and verification runs."""
    data, out = tmp_path / "many.npz", tmp_path / "out"
    out.mkdir()
    np.savez(data, x=np.random.default_rng(0).standard_normal((100_000, 1, 8, 8)).astype(np.float32))
    code = (EXTERNAL if external else "") + "from bnfold.cli.main import main; main()"
    args = [sys.executable, "-c", code, "export", str(DIGITS), "-o", str(out / "d.onnx"), "--inputs", str(data)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") for p in out.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.005)
        staged = next(p for p in out.iterdir() if p.name.endswith(".tmp"))
        assert staged.is_dir() == external
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines() == ["bnfold: error: interrupted; nothing was written"]
    assert list(out.iterdir()) == []


def test_2_an_unknown_fold_rule_names_the_flag_and_lists_the_rules(tmp_path):
    line = assert_one_line_error(run_cli("export", DIGITS, "--skip-rules", "conv_bn,nope"), 2, "--skip-rules", "nope")
    assert "conv_bn" in line and "multibranch" in line


def test_skip_rules_switches_a_rule_off_from_the_cli(tmp_path):
    result = run_cli("export", DIGITS, "-o", tmp_path / "d.onnx", "--skip-rules", "conv_bn")
    assert result.exit_code == 0, result.stderr
    assert "Fold report: 4 batch-norm(s): 0 folded, 4 kept" in result.stdout
