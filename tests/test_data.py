"""Reading .npy/.npz data: from paths and from open files (object-store bytes)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import bnfold
from bnfold.data import load_arrays, read_arrays


def _saved(save, **arrays) -> io.BytesIO:
    buffer = io.BytesIO()
    save(buffer, *arrays.values()) if save is np.save else save(buffer, **arrays)
    buffer.seek(0)
    return buffer


def test_an_open_npz_and_npy_read_like_files(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0])
    from_file = read_arrays(tmp_path / "d.npz", "`inputs`")
    from_bytes = load_arrays(_saved(np.savez, x=x, y=x[:, 0]), "s3://b/d.npz")
    assert sorted(from_bytes) == sorted(from_file) == ["x", "y"]
    np.testing.assert_array_equal(from_bytes["x"], from_file["x"])
    np.testing.assert_array_equal(load_arrays(_saved(np.save, a=x), "a.npy")[""], x)


def test_unreadable_bytes_and_pickled_arrays_are_refused_naming_the_source():
    with pytest.raises(bnfold.UsageError, match=r"^s3://b/d\.npy: not a readable \.npy/\.npz file"):
        load_arrays(io.BytesIO(b"garbage"), "s3://b/d.npy")
    with pytest.raises(bnfold.UsageError, match=r"not a readable \.npy/\.npz file.*pickle"):
        load_arrays(_saved(np.save, a=np.array([{"a": 1}], dtype=object)), "o.npy")
