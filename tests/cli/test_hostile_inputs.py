"""Broken inputs through the CLI: each is one stderr line naming the culprit and what to do, the
documented exit code, no traceback, and nothing written (not even a temporary file)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import DIGITS, DIGITS_ARCH, ROOT, assert_one_line_error, digits_state_dict, run_cli, snapshot

import bnfold
from bnfold import onnx_writer, staging
from bnfold.staging import atomic_write

ARCH_FILE = """
import torch
from torch import nn


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        raise ValueError("boom in forward")


class InfOutput(Raises):
    def forward(self, x):
        return self.bn(self.conv(x)) / 0.0


def raises():
    return Raises()


def inf_output():
    return InfOutput()
"""


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _save(tmp: Path, name: str, obj: object) -> Path:
    torch.save(obj, tmp / name)
    return tmp / name


def _digits_with(tmp: Path, key: str, index: tuple[int, ...], value: float) -> Path:
    state = digits_state_dict()
    state[key][index] = value
    return _save(tmp, "sd.pt", state)


def _mismatched(tmp: Path) -> Path:
    state = digits_state_dict()
    state.pop("head.0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.3.weight"] = torch.zeros(3, 64)
    return _save(tmp, "sd.pt", state)


def _arch(tmp: Path, factory: str) -> list[object]:
    (tmp / "arch.py").write_text(ARCH_FILE)
    from torch import nn

    state = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "bn": nn.BatchNorm2d(4)}).state_dict()
    return [_save(tmp, "sd.pt", state), "--arch", f"{tmp / 'arch.py'}:{factory}", "--input-shape", "1x1x8x8"]


def _npz(tmp: Path, **arrays: np.ndarray) -> Path:
    np.savez(tmp / "data.npz", **arrays)
    return tmp / "data.npz"


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _zip_with_flipped_byte(tmp: Path) -> Path:
    data = bytearray(DIGITS.read_bytes())
    data[len(data) // 3] ^= 0xFF
    return _bytes(tmp, "flipped.pt", bytes(data))


def _onnx_of_digits(tmp: Path) -> Path:
    assert run_cli("export", DIGITS, "-o", tmp / "d.onnx", "--no-verify").exit_code == 0
    return tmp / "d.onnx"


Case = Callable[[Path], list[object]]
OUT = "-o"
CASES: dict[str, tuple[Case, int, tuple[str, ...]]] = {
    # unreadable files
    "empty-file": (lambda t: ["export", _bytes(t, "m.pt", b"")], 3, ("m.pt", "empty")),
    "directory": (lambda t: ["export", t], 3, ("is a directory",)),
    "truncated-zip": (
        lambda t: ["export", _bytes(t, "m.pt", DIGITS.read_bytes()[:40000])],
        3,
        ("m.pt", "damaged archive"),
    ),
    "corrupt-zip": (
        lambda t: ["export", _zip_with_flipped_byte(t)],
        3,
        ("flipped.pt", "damaged archive", "re-download"),
    ),
    "random-bytes": (
        lambda t: ["export", _bytes(t, "m.pt", np.random.default_rng(0).bytes(4096))],
        3,
        ("m.pt", "not a PyTorch model"),
    ),
    "json-file": (lambda t: ["export", _bytes(t, "m.json", b'{"weights": [1, 2]}')], 3, ("m.json", "text or JSON")),
    "truncated-legacy-pickle": (
        lambda t: ["inspect", _bytes(t, "m.pt", _legacy_bytes(t)[:3000]), "--arch", DIGITS_ARCH],
        3,
        ("m.pt",),
    ),
    # a state_dict that does not match --arch: all three kinds of mismatch listed
    "arch-mismatch": (
        lambda t: ["export", _mismatched(t), "--arch", DIGITS_ARCH, "--input-shape", "1x1x8x8"],
        3,
        ("missing keys (1): head.0.bias", "unexpected keys (1): extra.weight", "head.3.weight (3, 64) vs (10, 64)"),
    ),
    # --arch-kwargs: the library checks what the JSON holds, and the CLI names the flags
    "arch-kwargs-not-an-object": (
        lambda t: ["inspect", _save(t, "sd.pt", digits_state_dict()), "--arch", DIGITS_ARCH, "--arch-kwargs", "[10]"],
        2,
        ("--arch-kwargs must be a mapping", "(got a list)"),
    ),
    "arch-kwargs-without-arch": (
        lambda t: ["inspect", DIGITS, "--arch-kwargs", '{"num_classes": 10}'],
        2,
        ("--arch-kwargs", "need --arch"),
    ),
    # --input-shape
    "no-input-shape": (
        lambda t: ["inspect", _save(t, "sd.pt", digits_state_dict()), "--arch", DIGITS_ARCH],
        2,
        ("does not record the model's input shape", "pass --input-shape"),
    ),
    "malformed-shape": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--input-shape", "1x1x8xfoo"],
        2,
        ("--input-shape", "1x1x8xfoo"),
    ),
    "wrong-rank": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--input-shape", "1x1x8"],
        3,
        ("input shape(s) 1x1x8", "--input-shape"),
    ),
    "wrong-channels": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--input-shape", "1x3x8x8"],
        3,
        ("1x3x8x8", "3 channels", "--input-shape"),
    ),
    "shape-for-verify": (lambda t: ["verify", DIGITS, t / "x.onnx", "--input-shape", "1x1x8x8"], 2, ("--input-shape",)),
    "malformed-preprocess-mean": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--preprocess-mean", "0.5,a"],
        2,
        ("--preprocess-mean '0.5,a'", "comma-separated numbers"),
    ),
    # corrupt weights and statistics
    "nan-weight": (
        lambda t: [
            "export",
            _digits_with(t, "features.0.0.weight", (0, 0, 0, 0), float("nan")),
            "--arch",
            DIGITS_ARCH,
            "--input-shape",
            "1x1x8x8",
        ],
        3,
        ("parameter 'features.0.0.weight'", "NaN/inf"),
    ),
    "inf-bias": (
        lambda t: [
            "inspect",
            _digits_with(t, "head.3.bias", (2,), float("inf")),
            "--arch",
            DIGITS_ARCH,
            "--input-shape",
            "1x1x8x8",
        ],
        3,
        ("parameter 'head.3.bias'", "NaN/inf"),
    ),
    "nan-statistics": (
        lambda t: [
            "export",
            _digits_with(t, "features.1.1.running_mean", (0,), float("nan")),
            "--arch",
            DIGITS_ARCH,
            "--input-shape",
            "1x1x8x8",
        ],
        3,
        ("batch-norm 'features.1.1'", "running_mean"),
    ),
    "negative-variance": (
        lambda t: [
            "export",
            _digits_with(t, "head.1.running_var", (5,), -0.5),
            "--arch",
            DIGITS_ARCH,
            "--input-shape",
            "1x1x8x8",
        ],
        3,
        ("batch-norm 'head.1'", "negative running_var"),
    ),
    # models that fail by themselves
    "forward-raises": (lambda t: ["export", *_arch(t, "raises")], 3, ("boom in forward", "fix the model's forward")),
    "reference-not-finite": (lambda t: ["export", *_arch(t, "inf_output")], 3, ("original model's output", "NaN/inf")),
    # --inputs data
    "inputs-dtype": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--inputs", _npz(t, x=np.zeros((4, 1, 8, 8), np.int64))],
        2,
        ("--inputs", "data.npz", "dtype int64"),
    ),
    "inputs-shape": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--inputs", _npz(t, x=np.zeros((4, 3, 8, 8), np.float32))],
        2,
        ("--inputs", "shape (4, 3, 8, 8)"),
    ),
    "inputs-names": (
        lambda t: [
            "export",
            DIGITS,
            OUT,
            t / "d.onnx",
            "--inputs",
            _npz(t, a=np.zeros((2, 1, 8, 8)), b=np.zeros((2, 1, 8, 8))),
        ],
        2,
        ("--inputs", "no array named", "['a', 'b']"),
    ),
    "inputs-not-npz": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--inputs", _bytes(t, "data.npz", b"not numpy")],
        2,
        ("--inputs", "data.npz", "not a readable"),
    ),
    "verify-inputs-dtype": (
        lambda t: ["verify", DIGITS, _onnx_of_digits(t), "--inputs", _npz(t, x=np.zeros((2, 1, 8, 8), bool))],
        2,
        ("--inputs", "dtype bool"),
    ),
    # output paths
    "output-folder-missing": (
        lambda t: ["export", DIGITS, OUT, t / "nope" / "d.onnx"],
        2,
        ("output folder", "nope", "does not exist"),
    ),
    "output-is-input": (
        lambda t: ["export", _copy(t, DIGITS, "m.pt"), OUT, t / "m.pt"],
        2,
        ("is the input model file",),
    ),
    "output-is-a-folder": (lambda t: ["export", DIGITS, OUT, t], 2, ("is a directory",)),
    "report-folder-missing": (
        lambda t: ["export", DIGITS, OUT, t / "d.onnx", "--report", t / "no" / "r.json"],
        2,
        ("no", "does not exist"),
    ),
    "predict-output-folder-missing": (
        lambda t: [
            "predict",
            _onnx_of_digits(t),
            _npz(t, x=np.zeros((2, 1, 8, 8), np.float32)),
            OUT,
            t / "no" / "p.npz",
        ],
        2,
        ("does not exist",),
    ),
    # unreadable ONNX files
    "verify-corrupt-onnx": (
        lambda t: ["verify", DIGITS, _bytes(t, "m.onnx", b"\x08\x07garbage")],
        3,
        ("m.onnx", "ONNX Runtime"),
    ),
    "predict-corrupt-onnx": (
        lambda t: ["predict", _bytes(t, "m.onnx", b"garbage"), _npz(t, x=np.zeros((1, 1, 8, 8), np.float32))],
        3,
        ("m.onnx",),
    ),
}


def _copy(tmp: Path, source: Path, name: str) -> Path:
    shutil.copy(source, tmp / name)
    return tmp / name


def _legacy_bytes(tmp: Path) -> bytes:
    torch.save(digits_state_dict(), tmp / "legacy.tmp", _use_new_zipfile_serialization=False)
    data = (tmp / "legacy.tmp").read_bytes()
    (tmp / "legacy.tmp").unlink()
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_is_one_line_with_its_exit_code_and_writes_nothing(tmp_path, case):
    make, code, fragments = CASES[case]
    args = make(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*args)
    assert_one_line_error(result, code, *fragments)
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback_instead(tmp_path):
    path = _bytes(tmp_path, "m.pt", b"")
    result = run_cli("--debug", "export", path)
    assert result.exit_code != 0 and isinstance(result.exception, bnfold.ModelLoadError)


# ------------------------------------------------------------------------ output locations
def _mount_tmpfs(folder: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A folder nobody may write to: a read-only tmpfs as root (root ignores permissions), else mode 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = _mount_tmpfs(folder, "ro,size=64k")
    if not mounted:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a read-only folder here")
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(stat.S_IRWXU)


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Path]:
    """A 64 KiB tmpfs: the digits model's ONNX file (about 100 KB) does not fit."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if not _mount_tmpfs(folder, "size=64k"):
        pytest.skip("mounting a tmpfs needs root (the ENOSPC case is also covered by test_disk_full_simulated)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", ["export", "report", "predict"])
def test_read_only_output_folder(read_only_folder, tmp_path, command):
    args = {
        "export": ["export", DIGITS, OUT, read_only_folder / "d.onnx"],
        "report": ["export", DIGITS, OUT, tmp_path / "d.onnx", "--report", read_only_folder / "r.json"],
        "predict": ["predict", ROOT / "missing.onnx", "x.npz", OUT, read_only_folder / "p.npz"],
    }[command]
    assert_one_line_error(run_cli(*args), 2, "not writable")
    assert snapshot(tmp_path) == {}


def test_special_file_as_output_is_refused_and_left_alone(tmp_path):
    """Writing "onto" a device or pipe (e.g. -o /dev/full) is refused: the atomic rename would
    replace the special file itself. A FIFO stands in for the device, so a regression cannot
    damage the machine running the test."""
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    assert_one_line_error(run_cli("export", DIGITS, OUT, fifo), 2, str(fifo), "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and snapshot(tmp_path) == {}


def test_disk_full_on_a_tiny_tmpfs(tiny_disk):
    result = run_cli("export", DIGITS, OUT, tiny_disk / "d.onnx")
    assert_one_line_error(result, 5, str(tiny_disk / "d.onnx"), "No space left on device")
    assert os.listdir(tiny_disk) == []


def test_disk_full_simulated(tmp_path, monkeypatch):
    """ENOSPC halfway through writing: a partial temporary file exists, then is removed."""
    partial: list[Path] = []

    def fills_the_disk(model, fh):
        fh.write(b"\x08" * 1000)
        partial.append(Path(fh.name))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_writer, "write_model", fills_the_disk)  # what staging calls
    result = run_cli("export", DIGITS, OUT, tmp_path / "d.onnx")
    assert_one_line_error(result, 5, "d.onnx", "No space left on device", "nothing was written")
    assert partial and not partial[0].exists()
    assert snapshot(tmp_path) == {}


def test_atomic_write_keeps_the_old_content_on_failure(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def fails(fh):
        fh.write(b"new, partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(bnfold.errors.OutputError, match="No space left"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and snapshot(tmp_path) == {"r.json": 3}
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_text() == "new" and snapshot(tmp_path) == {"r.json": 3}


def test_temporary_file_that_cannot_be_created_is_an_output_error(tmp_path, monkeypatch):

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(staging.tempfile, "mkstemp", read_only)
    assert_one_line_error(run_cli("export", DIGITS, OUT, tmp_path / "d.onnx"), 5, "Read-only file system")
    assert snapshot(tmp_path) == {}
