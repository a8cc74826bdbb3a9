"""Staged writes appear with the modes of files and folders created under the umask, not the
owner-only modes of their temporary names."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from helpers import umask

from bnfold import staging
from bnfold.staging import Staged, atomic_write, current_umask, external_data_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_an_atomic_write_has_the_umask_mode(tmp_path, mask, expected):
    with umask(mask):
        atomic_write(tmp_path / "p.npz", lambda fh: np.savez(fh, x=np.zeros(2)))
    assert mode(tmp_path / "p.npz") == expected


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_a_committed_onnx_file_and_its_data_have_the_umask_mode(tmp_path, mask, expected, external):
    out = tmp_path / "m.onnx"
    with umask(mask):
        staged = Staged(out, external=external)
        staged.path.write_bytes(b"model")
        if external:
            staged.path.with_name(external_data_path(out).name).write_bytes(b"data")
        staged.commit(None)
        staged.cleanup()
    assert mode(out) == expected
    if external:
        assert mode(external_data_path(out)) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx"] + ["m.onnx.data"] * external)


def test_the_umask_is_read_without_proc_too(tmp_path, monkeypatch):
    with umask(0o027):
        assert current_umask() == 0o027
        monkeypatch.setattr(staging, "PROC_STATUS", tmp_path / "missing")
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
