"""Nothing from a pickled model file runs unless it is trusted: malicious pickles through every
entry point, the safe-type allow-list, and refusals that name what the file would import."""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import pathlib
import pickle

import numpy as np
import pytest
import torch
from hostile import (
    DIGITS_ARCH,
    MALICIOUS_CONTAINERS,
    ROOT,
    OpensFile,
    RunsCommand,
    assert_one_line_error,
    digits_net,
    digits_state_dict,
    run_cli,
    snapshot,
    write_malicious,
)

import bnfold
from bnfold.loading import PICKLED_MODULE, load_model, unsafe_globals


# ------------------------------------------------------------------------- malicious pickles
@pytest.mark.parametrize("container", MALICIOUS_CONTAINERS)
def test_load_model_refuses_a_malicious_pickle_and_names_its_globals(tmp_path, container):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    with pytest.raises(bnfold.UnsafeModelError) as info:
        load_model(path, arch=DIGITS_ARCH)
    wanted = "io.open" if container == "raw_open" else "posix.system"
    assert wanted in str(info.value) and "`trust_pickle=True`" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("container", MALICIOUS_CONTAINERS)
def test_the_payloads_really_run_when_trusted(tmp_path, container):
    """Control: the same files do run code once trusted, so the refusal above is what stops them."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    with contextlib.suppress(bnfold.BnfoldError):  # it runs, and then it is not a model (or is one)
        load_model(path, arch=DIGITS_ARCH, trust_pickle=True)
    assert marker.exists()


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": digits_state_dict(), "payload": OpensFile(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "legacy.pt", "wb") as fh:
        pickle.dump(OpensFile(marker), fh, protocol=2)
    for name in ("evil.pt", "legacy.pt"):
        with pytest.raises(bnfold.BnfoldError):
            load_model(tmp_path / name, arch=DIGITS_ARCH)
    assert not marker.exists()


def test_pickled_module_is_refused_without_trust_and_names_the_globals(tmp_path):
    torch.save(digits_net(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UnsafeModelError) as info:
        load_model(tmp_path / "m.pt")
    assert "sample_models.architectures.DigitsCNN" in str(info.value) and "`trust_pickle=True`" in str(info.value)
    assert load_model(tmp_path / "m.pt", trust_pickle=True).format == PICKLED_MODULE


def test_zip_checkpoint_beyond_protocol_2_still_names_its_globals(tmp_path):
    """torch's own scanner (get_unsafe_globals_in_checkpoint) stops at protocol 4's opcodes;
    the opcode scan takes over, so the refusal still names the global."""
    marker = tmp_path / "pwned"
    path = tmp_path / "p4.pt"
    torch.save({"state_dict": digits_state_dict(), "x": RunsCommand(marker)}, path, pickle_protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand"):
        torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert unsafe_globals(path) == ["posix.system"]
    with pytest.raises(bnfold.UnsafeModelError, match=r"would import posix\.system"):
        load_model(path, arch=DIGITS_ARCH)
    assert not marker.exists()


def test_unsafe_globals_of_a_zip_checkpoint_are_torchs_minus_the_allow_list(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": digits_state_dict(), "acc": np.float64(0.9), "x": RunsCommand(tmp_path)}, path)
    assert "numpy.dtype" in set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert unsafe_globals(path) == ["posix.system"]  # numpy scalars are on bnfold's allow-list


CLI_ENTRY_POINTS = {
    "export": lambda model, t: [
        "export",
        model,
        "-o",
        t / "out.onnx",
        "--arch",
        DIGITS_ARCH,
        "--input-shape",
        "1x1x8x8",
    ],
    "inspect": lambda model, t: ["inspect", model, "--arch", DIGITS_ARCH, "--input-shape", "1x1x8x8"],
    "verify": lambda model, t: ["verify", model, ROOT / "sample_models" / "missing.onnx", "--arch", DIGITS_ARCH],
}


@pytest.mark.parametrize("container", ["zip", "legacy", "checkpoint", "raw_p4"])
@pytest.mark.parametrize("command", list(CLI_ENTRY_POINTS))
def test_every_cli_entry_point_refuses_without_running_it(tmp_path, command, container):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, container)
    before = snapshot(tmp_path)
    result = run_cli(*CLI_ENTRY_POINTS[command](path, tmp_path))
    assert_one_line_error(result, 3, str(path), "posix.system", "--trust-pickle")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_cli_trust_pickle_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, "zip")
    result = run_cli("inspect", path, "--trust-pickle", "--input-shape", "1x1x8x8")
    assert result.exit_code == 3 and marker.exists()


# ------------------------------------------------------------------------ the safe allow-list
ALLOWED_VALUES = {
    "numpy scalars": [np.dtype(c).type(1) for c in "?bBhHiIlLqQefdgFDG"],
    "numpy arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(["a", "bc"]), np.array([b"x"])],
    "numpy dtypes": [np.dtype("float64"), np.dtype("uint8")],
    "argparse.Namespace": [argparse.Namespace(lr=0.1, epochs=np.int64(3), name="run")],
}


@pytest.mark.parametrize("kind", list(ALLOWED_VALUES))
def test_harmless_checkpoint_contents_load_without_trust(tmp_path, kind):
    torch.save({"state_dict": digits_state_dict(), "extra": ALLOWED_VALUES[kind]}, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == "state_dict"


def test_checkpoints_written_with_numpy_1_module_names_load(tmp_path):
    """numpy 1.x pickles scalars as numpy.core.multiarray.scalar; numpy 2 renamed the module."""
    torch.save(
        {"state_dict": digits_state_dict(), "acc": np.float64(0.9)},
        tmp_path / "m.pt",
        _use_new_zipfile_serialization=False,
    )
    data = (tmp_path / "m.pt").read_bytes()
    other = (
        (b"numpy._core.multiarray", b"numpy.core.multiarray")
        if b"numpy._core" in data
        else (b"numpy.core.multiarray", b"numpy._core.multiarray")
    )
    assert other[0] in data
    (tmp_path / "m.pt").write_bytes(data.replace(*other))
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == "state_dict"


@pytest.mark.parametrize(
    "value, name",
    [
        (datetime.datetime(2024, 1, 1), "datetime.datetime"),
        (pathlib.PurePosixPath("/data"), "pathlib.PurePosixPath"),
        (collections.defaultdict(int), "collections.defaultdict"),
        (np.datetime64("2024-01-01"), None),  # a numpy type outside the allow-list
    ],
    ids=["datetime", "path", "defaultdict", "datetime64"],
)
def test_only_the_listed_types_are_allowed(tmp_path, value, name):
    torch.save({"state_dict": digits_state_dict(), "acc": np.float64(0.9), "extra": value}, tmp_path / "m.pt")
    with pytest.raises(bnfold.ModelLoadError) as info:
        load_model(tmp_path / "m.pt", arch=DIGITS_ARCH)
    message = str(info.value)
    assert "`trust_pickle=True`" in message
    if name:  # named, and the allowed numpy types beside it are not
        assert isinstance(info.value, bnfold.UnsafeModelError) and name in message and "numpy" not in message
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH, trust_pickle=True).format == "state_dict"


def test_garbage_after_a_pickle_header_is_damaged_not_unsafe(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"\x80\x02" + bytes(range(7, 200)))
    with pytest.raises(bnfold.ModelLoadError, match="cannot be read safely") as info:
        load_model(path)
    assert not isinstance(info.value, bnfold.UnsafeModelError)
