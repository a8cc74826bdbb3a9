"""Read a model file into an eval-mode module, safely: the format is detected from the content,
and each format goes to its reader. Nothing that can run arbitrary Python is unpickled unless
the user trusts the file."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, Param, UsageError, first_line
from ..user_module import quiet_torch
from .archive import check_export_archive, damaged_archive
from .loaded import (
    EXPORTED_PROGRAM,
    PICKLED_MODULE,
    STATE_DICT,
    TORCHSCRIPT,
    LoadedModel,
    check_finite,
    with_file_metadata,
)
from .pickles import load_pickled
from .state_dict import apply_state_dict, is_state_dict

# What _sniff returns for a torch.save file: a state_dict, a checkpoint dict or a pickled module.
PICKLE = "pickle"
# Extra file in TorchScript archives and torch.export programs where bnfold-aware tools record
# the input shapes, labels and preprocessing (a JSON object).
TORCHSCRIPT_META_FILE = "bnfold.json"
# Keys under which checkpoint dicts commonly hold their state_dict or module.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "weights", "net", "model", "module")


def sniff_format(path: Path) -> str:
    """The format of ``path`` from its content: :data:`TORCHSCRIPT`, :data:`EXPORTED_PROGRAM` or
    :data:`PICKLE`; a :class:`ModelLoadError` for anything else or a damaged archive."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                bad = archive.testzip()
        except Exception as exc:  # zipfile and zlib raise many types on damaged archives
            raise damaged_archive(path, f"{type(exc).__name__}: {exc}") from exc
        if bad is not None:
            raise damaged_archive(path, f"member {bad} fails its checksum")
        if any(n.endswith("/archive_format") for n in names) or any(
            "/models/" in n and n.endswith(".json") for n in names
        ):
            return EXPORTED_PROGRAM
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n.endswith("/data.pkl") for n in names):
            return PICKLE
        raise ModelLoadError(
            f"{path} is a zip archive but not a PyTorch model (no TorchScript code, export program or data.pkl)"
        )
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return PICKLE
    kind = (
        "a text or JSON file" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "of an unknown format"
    )
    raise ModelLoadError(
        f"{path} is not a PyTorch model file (it is {kind}); expected a TorchScript archive "
        "(torch.jit.save), a torch.export program (torch.export.save) or a torch.save checkpoint"
    )


def _extra_file_json(path: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``bnfold.json`` object read with the archive (empty if it has none)."""
    raw = extra.get(TORCHSCRIPT_META_FILE) or ""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: its {TORCHSCRIPT_META_FILE} is not valid JSON") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: its {TORCHSCRIPT_META_FILE} is not a JSON object")
    return meta


def _without_debug_info(path: Path) -> io.BytesIO:
    """The TorchScript archive minus its ``*.debug_pkl`` members (the Python source ranges shown in
    TorchScript errors). torch trusts their offsets: a damaged one loads, then crashes the process
    (a segfault) when a graph node is printed, as converting to an exported program does."""
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(buf, "w") as stripped:
        for name in source.namelist():
            if not name.endswith(".debug_pkl"):
                stripped.writestr(name, source.read(name))
    buf.seek(0)
    return buf


def _load_torchscript(path: Path) -> LoadedModel:
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        with quiet_torch():
            module = torch.jit.load(_without_debug_info(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable TorchScript archive: {first_line(exc)}") from exc
    return with_file_metadata(LoadedModel(module.eval(), path, TORCHSCRIPT), _extra_file_json(path, extra))


def _load_exported_program(path: Path, trust: bool) -> LoadedModel:
    if not trust:
        check_export_archive(path)
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        with quiet_torch():  # torch logs warnings, e.g. for an extension other than .pt2
            program = torch.export.load(str(path), extra_files=extra)
            user_inputs = set(program.graph_signature.user_inputs)
            placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
            module = program.module()
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a loadable torch.export program: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    vals = [n.meta.get("val") for n in placeholders]
    shapes = dtypes = None
    if vals and all(isinstance(v, torch.Tensor) for v in vals):
        shapes = [tuple(d if isinstance(d, int) else 1 for d in v.shape) for v in vals]
        dtypes = [v.dtype for v in vals]
    loaded = LoadedModel(module, path, EXPORTED_PROGRAM, shapes, dtypes)
    return with_file_metadata(loaded, _extra_file_json(path, extra))


def _interpret(path: Path, obj: Any, arch: str | None, arch_kwargs: Mapping[str, Any] | None) -> LoadedModel:
    """The model in an unpickled ``torch.save`` object: a module, a state_dict (built with
    ``arch``), or either inside a checkpoint dict whose other keys may record metadata."""
    meta: Mapping[str, Any] = {}
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        meta = obj
        inner = next(
            (obj[k] for k in STATE_DICT_KEYS if k in obj and (is_state_dict(obj[k]) or isinstance(obj[k], nn.Module))),
            None,
        )
        if inner is None:
            raise ModelLoadError(
                f"{path} is a checkpoint dict without a model: expected a state_dict under one of "
                f"{', '.join(STATE_DICT_KEYS)}; found keys {', '.join(map(str, list(obj)[:10]))}"
            )
        obj = inner
    if isinstance(obj, nn.Module):
        if arch:
            raise UsageError(f"{path} holds a whole module; ", Param("arch"), " is only for state_dict files")
        return with_file_metadata(LoadedModel(obj.eval(), path, PICKLED_MODULE), meta)
    if is_state_dict(obj):
        if not arch:
            raise UsageError(
                f"{path} holds a state_dict ({len(obj)} tensors) but no architecture: pass ",
                Param("arch"),
                " ('package.module:factory' or 'file.py:factory'), and ",
                Param("arch_kwargs"),
                " if the factory takes arguments",
            )
        module = apply_state_dict(path, obj, arch, arch_kwargs)
        return with_file_metadata(LoadedModel(module.eval(), path, STATE_DICT), meta)
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model, state_dict or checkpoint dict")


def _check_arch_arguments(arch: str | None, arch_kwargs: Mapping[str, Any] | None) -> None:
    if arch_kwargs is not None and not isinstance(arch_kwargs, Mapping):
        raise UsageError(
            Param("arch_kwargs"),
            f' must be a mapping of keyword arguments, e.g. {{"num_classes": 10}} (got a {type(arch_kwargs).__name__})',
        )
    if arch_kwargs and not arch:
        raise UsageError(Param("arch_kwargs"), " are the factory's arguments: they need ", Param("arch"))


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a trained model file into an eval-mode module.

    Formats (detected from the content, not the extension): TorchScript, ``torch.export``
    programs, a state_dict or checkpoint dict plus ``arch`` (``package.module:factory`` or
    ``file.py:factory``, called with ``arch_kwargs``), and a pickled ``nn.Module`` only when
    ``trust_pickle`` is true. Raises a :class:`~bnfold.errors.BnfoldError` subclass otherwise, and
    for a parameter holding NaN/inf.

    Nothing from the file runs unless ``trust_pickle``: pickles are read with
    ``weights_only=True`` (plus :func:`~bnfold.loading.pickles.safe_globals`), and
    ``torch.export`` archives are checked for code first
    (:func:`~bnfold.loading.archive.export_archive_problems`). ``arch`` imports and runs the
    module it names.
    """
    _check_arch_arguments(arch, arch_kwargs)
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give the model file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); re-save or re-download the model")
    fmt = sniff_format(path)
    if arch and fmt in (TORCHSCRIPT, EXPORTED_PROGRAM):
        raise UsageError(f"{path} is a {fmt} file that carries its own architecture; drop ", Param("arch"))
    if fmt == TORCHSCRIPT:
        loaded = _load_torchscript(path)
    elif fmt == EXPORTED_PROGRAM:
        loaded = _load_exported_program(path, trust_pickle)
    else:
        loaded = _interpret(path, load_pickled(path, trust_pickle), arch, arch_kwargs)
    return check_finite(loaded)
