"""Reading user data (``.npy``/``.npz``) and matching its arrays to model inputs."""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import Label, UsageError, label_parts

# For a single-input model, arrays with these names are taken as its input.
INPUT_KEYS = ("x", "input", "inputs", "data")

ArraysArg = str | os.PathLike[str] | np.ndarray | Mapping[str, np.ndarray]


def read_arrays(source: ArraysArg, label: Label) -> dict[str, np.ndarray]:
    """Named arrays from a ``.npy``/``.npz`` path, an array (named ``""``) or a mapping.

    ``label`` names the source in errors: library callers pass their parameter
    (``Param("inputs")``), which the CLI writes as its flag. Pickled object arrays are refused: they
    could run code.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise UsageError(*label_parts(label), f" {path}: file does not exist")
        return load_arrays(path, (*label_parts(label), f" {path}"))
    if isinstance(source, np.ndarray):
        return {"": source}
    return dict(source)


def load_arrays(file: str | os.PathLike[str] | BinaryIO, label: Label) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npy``/``.npz`` file (a path or an open, seekable binary file);
    a ``.npy`` array is named ``""``. Errors start with ``label``; pickled object arrays are refused."""
    try:
        loaded = np.load(file, allow_pickle=False)
        return dict(loaded.items()) if isinstance(loaded, np.lib.npyio.NpzFile) else {"": loaded}
    except Exception as exc:
        raise _unreadable(label, exc) from exc


def stream_arrays(stream: BinaryIO, label: Label) -> dict[str, np.ndarray]:
    """:func:`load_arrays` for a binary stream read once from its start (a file system's input
    stream, which need not seek): a ``.npy`` array of numbers is read straight into its own
    memory; any other file (``.npz``, other dtypes, format version 3.0) is read whole and given
    to ``np.load``.

    ``np.load`` on the bytes of a ``.npy`` file copies them again, chunk by chunk, into pages
    the array touches for the first time: 48-76 ms of CPU for a 38 MB file where reading it
    into the array takes 4.4 ms (``benchmarks/ray_read_cost.py``, docs/performance.md). An
    ``OSError`` of the stream is raised as it is (the file could not be read); what it holds that
    is not an array is a :class:`UsageError`."""
    try:
        head = _read_up_to(stream, len(NPY_MAGIC) + 2)
        if len(head) == len(NPY_MAGIC) + 2 and head.startswith(NPY_MAGIC) and (head[-2], head[-1]) in NPY_READ_HERE:
            head += _read_exactly(stream, 2 if head[-2] == 1 else 4)  # the header's length
            head += _read_exactly(stream, int.from_bytes(head[len(NPY_MAGIC) + 2 :], "little"))
            header = io.BytesIO(head)
            version = np.lib.format.read_magic(header)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(header)
            if dtype.kind in NUMBER_KINDS:
                return {"": _read_into_array(stream, shape, fortran_order, dtype)}
        return load_arrays(io.BytesIO(head + stream.read()), label)
    except (OSError, UsageError):
        raise
    except Exception as exc:  # numpy's header parser raises ValueError, TypeError, IndexError...
        raise _unreadable(label, exc) from exc


def declared_elements(data: bytes, label: str) -> int:
    """How many elements the arrays of the ``.npy``/``.npz`` file ``data`` declare, read from
    their headers alone: a ``.npz`` member is decompressed only as far as its header, so a
    compressed bomb is measured without being expanded. A member that is not a ``.npy`` file
    counts its bytes (``np.load`` returns it as bytes); data that is neither format counts 0
    (:func:`load_arrays` refuses it). A header that cannot be read is a :class:`UsageError`
    starting with ``label``."""
    try:
        if data[:4] in ZIP_MAGIC:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                total = 0
                for member in archive.infolist():
                    if not member.filename.endswith(".npy"):
                        total += member.file_size
                        continue
                    with archive.open(member) as stream:
                        total += _header_elements(stream)
                return total
        if data.startswith(NPY_MAGIC):
            return _header_elements(io.BytesIO(data))
    except Exception as exc:  # zipfile's and numpy's header parsers raise BadZipFile, ValueError, TypeError...
        raise _unreadable(label, exc) from exc
    return 0


def _header_elements(stream: BinaryIO) -> int:
    """The elements the ``.npy`` header at the start of ``stream`` declares (a structured dtype
    counts each item's bytes); a ``ValueError`` if it is not a readable header."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    per_item = dtype.itemsize if dtype.names else math.prod(dtype.shape)
    return math.prod(shape) * per_item


# .npz files are zip archives (numpy.load tells them by these first bytes: a member, or an empty archive).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# .npy files start with the magic string and the format's version (numpy.lib.format); versions
# 1.0 and 2.0 have latin-1 headers, which numpy's public functions parse (3.0: UTF-8 field names).
NPY_MAGIC = b"\x93NUMPY"
NPY_READ_HERE = ((1, 0), (2, 0))
# Booleans, integers, floats, complex numbers: dtypes whose bytes are the array's (no fields,
# sub-arrays, objects or zero-size items).
NUMBER_KINDS = "biufc"


def _read_into_array(stream: BinaryIO, shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype) -> np.ndarray:
    """The array of ``shape`` and ``dtype`` whose bytes come next in ``stream``; a ``ValueError``
    if it ends before."""
    array = np.empty(shape[::-1] if fortran_order else shape, dtype)
    view, done = memoryview(array.reshape(-1).view(np.uint8)), 0
    while done < array.nbytes:
        got = stream.readinto(view[done:])
        if not got:
            raise ValueError(f"the file ends after {done} of the array's {array.nbytes} bytes")
        done += got
    return array.T if fortran_order else array


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``stream``; a ``ValueError`` if it ends before."""
    data = _read_up_to(stream, size)
    if len(data) < size:
        raise ValueError("the file ends inside its .npy header")
    return data


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``stream``, fewer if it ends before (a read may return fewer bytes
    than asked for without being at the end; the chunks are joined once, not one by one, which
    would copy a corrupt header's claimed megabytes again at every short read)."""
    chunks, got = [], 0
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _unreadable(label: Label, exc: Exception) -> UsageError:
    return UsageError(*label_parts(label), f": not a readable .npy/.npz file ({type(exc).__name__}: {exc})")


def select_inputs(arrays: Mapping[str, np.ndarray], names: Sequence[str], label: Label) -> list[np.ndarray]:
    """One float array per model input, in ``names`` order, all with the same number of samples;
    errors start with ``label`` (see :func:`read_arrays`).

    A single-input model takes the array named after its input, else one named like
    :data:`INPUT_KEYS`, else the only array; several inputs need one array per input name.
    """
    if len(names) == 1:
        found = next((arrays[k] for k in (names[0], *INPUT_KEYS) if k in arrays), None)
        if found is None and len(arrays) == 1:
            found = next(iter(arrays.values()))
        if found is None:
            raise UsageError(
                *label_parts(label), f": no array named '{names[0]}' (the model input); it has {sorted(arrays)}"
            )
        selected = [found]
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UsageError(*label_parts(label), f": no array for model input(s) {missing}; it has {sorted(arrays)}")
        selected = [arrays[n] for n in names]
    for name, array in zip(names, selected):
        if array.dtype.kind != "f":
            raise UsageError(
                *label_parts(label), f": array for input '{name}' has dtype {array.dtype}; expected floats"
            )
        if array.ndim == 0:
            raise UsageError(
                *label_parts(label), f": array for input '{name}' is a scalar; expected a batch of samples"
            )
    if len({a.shape[0] for a in selected}) != 1:
        raise UsageError(*label_parts(label), ": arrays have different numbers of samples")
    if selected[0].shape[0] == 0:
        raise UsageError(*label_parts(label), ": the arrays hold no samples")
    return selected
