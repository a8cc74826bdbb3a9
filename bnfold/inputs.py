"""Which input files a path names, one rule for ``bnfold predict`` and ``bnfold predict --ray``.

A file is itself; a folder is the files below it, at any depth, whose suffix is a known kind:
images, ``.npy``/``.npz`` arrays or parquet tables; names that start with ``.`` or ``_`` (files or
folders: editor and system files, Spark's ``_SUCCESS``) are skipped, other suffixes ignored. The
files are sorted. All the inputs of a run are one kind: a folder, or a list of inputs, that mixes
kinds is a :class:`~bnfold.UsageError` naming them, never a silent drop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import Label, UsageError, label_parts
from .images import IMAGE_SUFFIXES

IMAGES, ARRAYS, TABLES = "images", "arrays", "tables"
ARRAY_SUFFIXES = (".npy", ".npz")
TABLE_SUFFIXES = (".parquet",)
KINDS = {
    **dict.fromkeys(IMAGE_SUFFIXES, IMAGES),
    **dict.fromkeys(ARRAY_SUFFIXES, ARRAYS),
    **dict.fromkeys(TABLE_SUFFIXES, TABLES),
}
SKIPPED_PREFIXES = (".", "_")


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """``IMAGES``, ``ARRAYS`` or ``TABLES`` for a file name's suffix (any case); ``None`` for
    another suffix."""
    return KINDS.get(Path(str(path).rstrip("/")).suffix.lower())


def folder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The input files below ``folder`` (see the module's rule), sorted; a :class:`UsageError` if
    there are none or they are of several kinds."""
    root = Path(folder)
    found = []
    for parent, folders, names in os.walk(root):
        folders[:] = [name for name in folders if not name.startswith(SKIPPED_PREFIXES)]
        found += [Path(parent, name) for name in names if not name.startswith(SKIPPED_PREFIXES) and file_kind(name)]
    if not found:
        suffixes = ", ".join(KINDS)
        raise UsageError(f"{root}: no input files in this folder (looked for {suffixes}, in sub-folders too)")
    files = sorted(found)
    one_kind(files, str(root))
    return files


def local_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files that local ``paths`` name (files as they are, folders by :func:`folder_files`),
    all of one kind; a :class:`UsageError` naming a path that does not exist, or the kinds mixed."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += folder_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path} does not exist")
    return files


def one_kind(files: Sequence[str | os.PathLike[str]], where: Label) -> str:
    """The kind of ``files``; a :class:`UsageError` naming ``where`` and an example of each kind
    if they mix kinds. Files of no known kind count as images (an object-store prefix, or a file
    named without its suffix, which the image reader then reports)."""
    examples: dict[str, str] = {}
    for file in files:
        examples.setdefault(file_kind(file) or IMAGES, str(file))
    if len(examples) > 1:
        mixed = " and ".join(f"{kind} ({example})" for kind, example in sorted(examples.items()))
        raise UsageError(*label_parts(where), f" mixes {mixed}: predict one kind of input at a time")
    return next(iter(examples), IMAGES)
