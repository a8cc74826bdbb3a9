"""Reading .npy/.npz data: from paths and from open files (object-store bytes)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import bnfold
from bnfold.arrays import load_arrays, read_arrays, stream_arrays


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


class TrickleStream:
    """A forward-only binary stream that hands out at most ``step`` bytes per sized read, like a
    network stream; unless ``whole``, it fails the test if the data of a .npy file is asked for
    as bytes (rather than read into the array)."""

    def __init__(self, data: bytes, *, whole: bool = False, step: int = 7) -> None:
        self.data, self.whole, self.at, self.step = data, whole, 0, step

    def read(self, size: int = -1) -> bytes:
        assert self.whole or 0 <= size <= 4096, "a .npy file's data read as bytes"
        size = len(self.data) - self.at if size < 0 else min(size, self.step)  # read(): all of the rest
        chunk = self.data[self.at : self.at + size]
        self.at += len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(min(len(buffer), self.step))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
    return buffer.getvalue()


def _hand_made_npy(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file with this header text (numpy's own writer checks its headers)."""
    text = header.encode("latin1") + b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@pytest.mark.parametrize(
    ("array", "version"),
    [
        (np.arange(24, dtype=np.float32).reshape(2, 3, 4), None),
        (np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)), None),
        (np.arange(6, dtype=">f4").reshape(3, 2), (2, 0)),
        (np.array([[True, False]]), None),
        (np.zeros((0, 3), np.float16), None),
    ],
    ids=["c-order", "fortran-order", "big-endian-v2", "bool", "empty"],
)
def test_a_npy_stream_of_numbers_reads_into_the_array_as_np_load_reads_it(array, version):
    data = _npy_bytes(array, version)
    got = stream_arrays(TrickleStream(data), "s3://b/a.npy")[""]
    expected = np.load(io.BytesIO(data))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.flags.f_contiguous == expected.flags.f_contiguous
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "data",
    [
        _npy_bytes(np.zeros(2, dtype=[("π", "<f4")]), (3, 0)),  # UTF-8 field names need version 3.0
        _npy_bytes(np.array([b"ab", b"c"])),
        _saved(np.savez, x=np.arange(6, dtype=np.float32), y=np.ones(2)).getvalue(),
    ],
    ids=["utf8-field-names-v3", "bytes", "npz"],
)
def test_other_streams_read_as_np_load_reads_them(data):
    got = stream_arrays(TrickleStream(data, whole=True), "s3://b/d.npz")
    expected = np.load(io.BytesIO(data))
    expected = dict(expected.items()) if isinstance(expected, np.lib.npyio.NpzFile) else {"": expected}
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"garbage", "UnpicklingError|ValueError"),
        (_npy_bytes(np.zeros((2, 3), np.float32))[:-5], "the file ends after 19 of the array's 24 bytes"),
        (_npy_bytes(np.zeros((2, 3), np.float32))[:20], "the file ends inside its .npy header"),
        (b"\x93NUMPY\x09\x00" + _npy_bytes(np.zeros(2, np.float32))[8:], r"format version"),
        (_npy_bytes(np.array([{"a": 1}], dtype=object)), "pickle"),
        (_hand_made_npy("{'descr': ('<f4', (2,)), 'fortran_order': False, 'shape': (3,), }", bytes(24)), "all data"),
        (_hand_made_npy("{[]: 1}"), "TypeError"),
        (_hand_made_npy("{'descr': (), 'fortran_order': False, 'shape': (3,), }"), "IndexError"),
    ],
    ids=[
        "not-an-array",
        "truncated-data",
        "truncated-header",
        "unknown-version",
        "object-array",
        "sub-array-dtype",
        "bad-header",
        "bad-descr",
    ],
)
def test_a_stream_that_is_not_an_array_is_refused_naming_it(data, error):
    with pytest.raises(bnfold.UsageError, match=rf"^s3://b/d\.npy: not a readable \.npy/\.npz file.*({error})"):
        stream_arrays(TrickleStream(data, whole=True), "s3://b/d.npy")
