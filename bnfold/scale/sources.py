"""Inputs as Ray Datasets read by Ray Data's file readers (any file system or object store Ray
reads): image files and ``.npy``/``.npz`` arrays become rows named by ``item``, and a file that
cannot be read becomes a row with its ``error`` instead of failing the job.

Rows of image files carry the file's bytes (column ``bytes``, as ``ray.data.read_binary_files``
names it); rows of arrays carry one sample each, encoded as a ``.npy`` (one model input) or
``.npz`` (one array per input name) in column ``npy``. Decoding happens in the prediction actors.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Dataset, read_datasource, read_parquet
from ray.data.datasource import FileBasedDatasource

from ..data import load_arrays, select_inputs
from ..errors import UsageError, first_line
from ..images import IMAGE_SUFFIXES

IMAGES, ARRAYS, TABLES = "images", "arrays", "tables"
ARRAY_SUFFIXES = (".npy", ".npz")
TABLE_SUFFIXES = (".parquet",)
_KINDS = {**dict.fromkeys(IMAGE_SUFFIXES, IMAGES), **dict.fromkeys(ARRAY_SUFFIXES, ARRAYS), ".parquet": TABLES}
# Rows of one array file per block: about this many bytes of samples.
BLOCK_BYTES = 64 << 20


def input_kind(path: str) -> str:
    """``"images"``, ``"arrays"`` or ``"tables"`` (parquet): from the name's suffix; a local
    folder by the first file in it with a known suffix; other names (object-store prefixes) are
    read as folders of images."""
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix in _KINDS:
        return _KINDS[suffix]
    if os.path.isdir(path):
        for _, _, files in os.walk(path):
            for name in sorted(files):
                if Path(name).suffix.lower() in _KINDS and not name.startswith((".", "_")):
                    return _KINDS[Path(name).suffix.lower()]
        raise UsageError(f"{path}: no image, .npy/.npz or .parquet files in this folder")
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    return IMAGES


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``paths`` with local glob patterns (``data/*.npy``) replaced by the files they match."""
    expanded = []
    for path in map(str, paths):
        if "://" not in path and any(c in path for c in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UsageError(f"{path}: no file matches this pattern")
            expanded.extend(matches)
        else:
            expanded.append(path)
    return expanded


def read_inputs(
    paths: Sequence[str | os.PathLike[str]], input_names: Sequence[str], concurrency: int
) -> tuple[Dataset, str]:
    """(a Dataset of the inputs at ``paths``, their kind): image files, ``.npy``/``.npz`` arrays or
    parquet tables, all of one kind. ``input_names`` are the model's inputs (which arrays of an
    ``.npz`` to take); ``concurrency``: read tasks at a time. Read tasks reserve no CPU: the
    prediction actors, which decode the files, hold the CPUs."""
    files = expand_paths(paths)
    if not files:
        raise UsageError("`data` names no input")
    kinds = {input_kind(path) for path in files}
    if len(kinds) > 1:
        raise UsageError(f"`data` mixes {' and '.join(sorted(kinds))}: predict one kind of input at a time")
    kind = kinds.pop()
    try:  # Ray lists the files now: its errors say what it found (nothing, or no such path)
        if kind == TABLES:
            return read_parquet(files, num_cpus=0, concurrency=concurrency), kind
        source = ImageFiles(files) if kind == IMAGES else ArrayFiles(files, list(input_names))
    except (ValueError, OSError) as exc:
        raise UsageError(f"`data` {', '.join(files)}: {first_line(exc)}") from exc
    return read_datasource(source, num_cpus=0, concurrency=concurrency), kind


class _NamedFiles(FileBasedDatasource):
    """A file-based datasource whose rows name their file as it was given (``s3://...``) and
    whose unreadable files become rows with an ``error`` (through :meth:`rows`)."""

    column = "bytes"  # the payload column

    def __init__(self, paths: list[str], extensions: Sequence[str]) -> None:
        super().__init__(paths, file_extensions=[s.lstrip(".") for s in extensions])
        scheme = paths[0].split("://", 1)[0] if "://" in paths[0] else ""
        self.scheme = f"{scheme}://" if scheme and scheme != "local" else ""

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except OSError as exc:  # passed on to _read_stream as the file's error
            return _Unreadable(exc)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        name = path if path.startswith(self.scheme) else self.scheme + path
        if isinstance(f, OSError):
            yield self.error_row(name, f"{name}: cannot read it ({f.strerror or f})")
            return
        try:
            data = f.readall()
        except OSError as exc:
            yield self.error_row(name, f"{name}: cannot read it ({exc.strerror or exc})")
            return
        yield from self.rows(name, data)

    def rows(self, name: str, data: bytes) -> Iterator[pa.Table]:
        """The rows of the file ``name`` whose content is ``data``."""
        raise NotImplementedError

    def error_row(self, name: str, error: str) -> pa.Table:
        """The one row that stands for the unreadable file ``name``."""
        return _table([name], [b""], [error], self.column)


class ImageFiles(_NamedFiles):
    """Image files, one row each: ``item`` (the path), ``bytes`` (the file), ``error``."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(paths, IMAGE_SUFFIXES)

    def rows(self, name: str, data: bytes) -> Iterator[pa.Table]:
        yield _table([name], [data], [None], self.column)


class ArrayFiles(_NamedFiles):
    """``.npy``/``.npz`` files, one row per sample: ``item`` (``path:row``), ``npy`` (the sample as
    a ``.npy``, or an ``.npz`` of one array per input of ``input_names``), ``error``. A file that is
    not readable or lacks the model's arrays is one row with its error."""

    column = "npy"

    def __init__(self, paths: list[str], input_names: list[str]) -> None:
        super().__init__(paths, ARRAY_SUFFIXES)
        self.input_names = input_names

    def rows(self, name: str, data: bytes) -> Iterator[pa.Table]:
        try:
            arrays = select_inputs(load_arrays(io.BytesIO(data), name), self.input_names, name)
        except UsageError as exc:
            yield self.error_row(name, str(exc))
            return
        samples = arrays[0].shape[0]
        per_block = max(1, BLOCK_BYTES // max(1, sum(a[0].nbytes for a in arrays)))
        for start in range(0, samples, per_block):
            stop = min(samples, start + per_block)
            items = [f"{name}:{row}" for row in range(start, stop)]
            encoded = [
                encode_sample([a[row : row + 1] for a in arrays], self.input_names) for row in range(start, stop)
            ]
            yield _table(items, encoded, [None] * len(items), self.column)


def encode_sample(arrays: Sequence[np.ndarray], input_names: Sequence[str]) -> bytes:
    """One sample (arrays with a batch axis of 1) as bytes: a ``.npy`` of its one array, or an
    ``.npz`` of one array per input."""
    buffer = io.BytesIO()
    if len(arrays) == 1:
        np.save(buffer, arrays[0], allow_pickle=False)
    else:
        np.savez(buffer, **dict(zip(input_names, arrays)))
    return buffer.getvalue()


class _Unreadable:
    """Stands in for a file that could not be opened, with the reason, until ``_read_stream``."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def __enter__(self) -> OSError:
        return self.error

    def __exit__(self, *exc: object) -> None:
        return None


def _table(items: list[str], payload: list[bytes], errors: list[str | None], column: str) -> pa.Table:
    return pa.table(
        {
            "item": pa.array(items, pa.string()),
            column: pa.array(payload, pa.binary()),
            "error": pa.array(errors, pa.string()),
        }
    )
