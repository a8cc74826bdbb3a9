"""Inputs as Ray Datasets read by Ray Data's file readers (any file system or object store Ray
reads): image files and ``.npy``/``.npz`` arrays become rows named by ``item``, and a file that
cannot be read becomes a row with its ``error`` instead of failing the job.

Rows of image files carry the file's bytes (column ``bytes``, as ``ray.data.read_binary_files``
names it), decoded in the prediction actors; rows of arrays carry one sample per model input, in
a tensor column named after the input (the actors read them without a copy).
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Dataset, read_datasource, read_parquet
from ray.data.block import BlockAccessor
from ray.data.datasource import FileBasedDatasource
from ray.data.extensions import ArrowTensorArray

from ..arrays import select_inputs, stream_arrays
from ..errors import Param, UsageError, first_line
from ..images import IMAGE_SUFFIXES
from ..inputs import ARRAY_SUFFIXES, IMAGES, TABLES, local_inputs, one_kind
from ..predictor import TensorSpec

# Rows of one array file per block: about this many bytes of samples.
BLOCK_BYTES = 64 << 20
# Files read on the driver, before the job, to find a row that fits the model (see InputRows).
FIRST_FILES_CHECKED = 8


def input_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[str, list[str]]:
    """The kind and the files or object-store URLs that ``paths`` name: local glob patterns
    (``data/*.npy``) expanded, local folders listed as ``bnfold predict`` lists them
    (:mod:`bnfold.inputs`), object-store URLs kept for Ray to list; a :class:`UsageError` if they
    mix kinds."""
    files: list[str] = []
    for path in map(str, paths):
        if "://" in path:
            files.append(path)
        elif any(c in path for c in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UsageError(f"{path}: no file matches this pattern")
            files += map(str, local_inputs(matches))
        else:
            files += map(str, local_inputs([path]))
    if not files:
        raise UsageError(Param("data"), " names no input")
    return one_kind(files, Param("data")), files


@dataclass(frozen=True)
class InputRows:
    """Inputs as a Ray Dataset; for files, their kind (``IMAGES``, ``ARRAYS`` or ``TABLES``) and,
    for images and arrays, bnfold's datasource reading them."""

    dataset: Dataset
    kind: str | None = None
    source: _NamedFiles | None = None

    def first_batch(self) -> dict[str, np.ndarray]:
        """The first row that holds a sample, as a numpy batch: from bnfold's datasource, the
        first good row of its first ``FIRST_FILES_CHECKED`` files, else the first of their rows
        (one with its error); a ``ValueError`` if there is no row.

        Those files are read here, one at a time in the job's order, by the datasource's own read
        function (which reads its files lazily): a Ray execution to take a row costs seconds,
        starting read tasks that each read a whole file."""
        if self.source is None:
            return self.dataset.take_batch(1, batch_format="numpy")
        first = None
        blocks = (block for task in self.source.get_read_tasks(1) for block in task())
        for block in itertools.islice(blocks, FIRST_FILES_CHECKED):  # a file is one block or more
            if not block.num_rows:
                continue
            batch = BlockAccessor.for_block(block.slice(0, 1)).to_batch_format("numpy")
            if batch["error"][0] is None:
                return batch
            if first is None:
                first = batch
        if first is None:
            raise ValueError("no input file holds a row")
        return first


def read_inputs(paths: Sequence[str | os.PathLike[str]], inputs: Sequence[TensorSpec], concurrency: int) -> InputRows:
    """The inputs at ``paths`` (see :func:`input_files`): image files, ``.npy``/``.npz`` arrays or
    parquet tables, all of one kind, for a model with ``inputs``. ``concurrency``: read tasks at a
    time, at most one per file. Read tasks reserve no CPU: the prediction actors, which decode the
    files, hold the CPUs."""
    kind, files = input_files(paths)
    if not any("://" in file for file in files):
        concurrency = min(concurrency, len(files))
    try:  # Ray lists the files now: its errors say what it found (nothing, or no such path)
        if kind == TABLES:
            return InputRows(read_parquet(files, num_cpus=0, concurrency=concurrency), kind)
        source = ImageFiles(files) if kind == IMAGES else ArrayFiles(files, list(inputs))
    except (ValueError, OSError) as exc:
        raise UsageError(Param("data"), f" {', '.join(files)}: {first_line(exc)}") from exc
    return InputRows(read_datasource(source, num_cpus=0, concurrency=concurrency), kind, source)


class _NamedFiles(FileBasedDatasource):
    """A file-based datasource whose rows name their file as it was given (``s3://...``) and
    whose unreadable files become rows with an ``error`` (through :meth:`rows`)."""

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
        try:
            if isinstance(f, OSError):
                raise f
            tables = self.rows(name, f)
        except OSError as exc:
            tables = [self.error_row(name, f"{name}: cannot read it ({exc.strerror or exc})")]
        yield from tables

    def rows(self, name: str, stream: Any) -> list[pa.Table]:
        """The rows of the file ``name``, read whole from the binary ``stream`` (an ``OSError``
        if it cannot be): all of them before the first leaves, so a file that fails while being
        read is one row with its error, never some of its rows and then that row."""
        raise NotImplementedError

    def error_row(self, name: str, error: str) -> pa.Table:
        """The one row that stands for the unreadable file ``name``."""
        return pa.table({"item": _strings([name]), "bytes": pa.array([b""], pa.binary()), "error": _strings([error])})


class ImageFiles(_NamedFiles):
    """Image files, one row each: ``item`` (the path), ``bytes`` (the file), ``error``."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(paths, IMAGE_SUFFIXES)

    def rows(self, name: str, stream: Any) -> list[pa.Table]:
        data = stream.readall()
        return [pa.table({"item": _strings([name]), "bytes": pa.array([data], pa.binary()), "error": _strings([None])})]


class ArrayFiles(_NamedFiles):
    """``.npy``/``.npz`` files, one row per sample: ``item`` (``path:row``), a tensor column per
    model input of ``inputs`` (the sample, in the input's dtype), ``error``. A file that cannot be
    read or lacks the model's arrays is one row with its error, a file of the wrong shape a row
    per sample with its error (the Predictor's); their tensors are empty placeholders."""

    def __init__(self, paths: list[str], inputs: list[TensorSpec]) -> None:
        super().__init__(paths, ARRAY_SUFFIXES)
        self.inputs = inputs

    def rows(self, name: str, stream: Any) -> list[pa.Table]:
        try:
            arrays = select_inputs(stream_arrays(stream, name), [spec.name for spec in self.inputs], name)
        except UsageError as exc:
            return [self.error_row(name, str(exc))]
        samples = arrays[0].shape[0]
        misfit = next((spec for spec, a in zip(self.inputs, arrays) if not spec.fits((1, *a.shape[1:]))), None)
        if misfit is not None:
            shape = (1, *arrays[self.inputs.index(misfit)].shape[1:])
            error = str(misfit.shape_error(shape))
            return [self._table([f"{name}:{row}" for row in range(samples)], None, [error] * samples)]
        arrays = [np.ascontiguousarray(a, dtype=spec.dtype) for spec, a in zip(self.inputs, arrays)]
        per_block = max(1, BLOCK_BYTES // max(1, sum(a[0].nbytes for a in arrays)))
        blocks = []
        for start in range(0, samples, per_block):
            stop = min(samples, start + per_block)
            items = [f"{name}:{row}" for row in range(start, stop)]
            blocks.append(self._table(items, [a[start:stop] for a in arrays], [None] * len(items)))
        return blocks

    def error_row(self, name: str, error: str) -> pa.Table:
        return self._table([name], None, [error])

    def _table(self, items: list[str], arrays: list[np.ndarray] | None, errors: list[str | None]) -> pa.Table:
        """Rows of ``items``: their samples ``arrays`` (one per input), or empty placeholders."""
        if arrays is None:
            arrays = [np.zeros((len(items), *[0] * (len(spec.shape) - 1)), spec.dtype) for spec in self.inputs]
        columns = {spec.name: ArrowTensorArray.from_numpy(a) for spec, a in zip(self.inputs, arrays)}
        return pa.table({"item": _strings(items), **columns, "error": _strings(errors)})


class _Unreadable:
    """Stands in for a file that could not be opened, with the reason, until ``_read_stream``."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def __enter__(self) -> OSError:
        return self.error

    def __exit__(self, *exc: object) -> None:
        return None


def _strings(values: Sequence[str | None]) -> pa.Array:
    return pa.array(list(values), pa.string())
