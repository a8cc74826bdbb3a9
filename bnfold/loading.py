"""Read a model file into an eval-mode module, safely: the format is detected from the content,
and nothing that can run arbitrary Python is unpickled unless the user trusts the file."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError, UnsafeModelError, UsageError
from .metadata import Preprocess

TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "torch.export"
STATE_DICT = "state_dict"
PICKLED_MODULE = "pickled nn.Module"

# Extra file in TorchScript archives and torch.export programs where bnfold-aware tools record
# the input shapes, labels and preprocessing (a JSON object).
TORCHSCRIPT_META_FILE = "bnfold.json"
# Keys under which checkpoint dicts commonly hold their state_dict or module.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "weights", "net", "model", "module")
INPUT_SHAPE_KEYS = ("input_shape", "input_shapes")
# Key prefixes added by wrappers: nn.DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Shape = tuple[int, ...]


@dataclass
class LoadedModel:
    """A model ready for folding: the module in eval mode and what the file says of its inputs."""

    module: nn.Module
    path: Path
    format: str
    input_shapes: list[Shape] | None = None
    """One shape per model input, batch first, if the file records them."""
    input_dtypes: list[torch.dtype] | None = None
    labels: list[str] | None = None
    """Class labels the file carries (``labels`` key / ``bnfold.json``), if any."""
    preprocess: Preprocess | None = None
    """Image preprocessing the file carries (``preprocess`` key / ``bnfold.json``), if any."""

    def example_inputs(self, input_shapes: Sequence[Shape] | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded random-normal inputs of ``input_shapes`` (or the shapes the file records)."""
        shapes = list(input_shapes) if input_shapes else self.input_shapes
        if not shapes:
            raise UsageError(
                f"{self.path}: the file does not record the model's input shape; "
                "pass --input-shape, e.g. --input-shape 1x3x224x224"
            )
        dtypes = self.input_dtypes if self.input_dtypes and len(self.input_dtypes) == len(shapes) else None
        gen = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn(shape, generator=gen, dtype=torch.float32).to(dtypes[i] if dtypes else torch.float32)
            for i, shape in enumerate(shapes)
        )


def parse_shape(text: str) -> Shape:
    """Parse ``"1x3x224x224"`` into ``(1, 3, 224, 224)``; a :class:`UsageError` if malformed."""
    if not re.fullmatch(r"\s*[1-9]\d*(\s*[xX,]\s*[1-9]\d*)*\s*", text or ""):
        raise UsageError(
            f"--input-shape {text!r} is not a shape: give positive sizes separated by 'x', "
            "batch first, e.g. 1x3x224x224"
        )
    return tuple(int(p) for p in re.split(r"[xX,]", text))


def _shapes_from(value: Any, source: str) -> list[Shape]:
    try:
        items = value if value and isinstance(value[0], (list, tuple)) else [value]
        return [tuple(int(d) for d in s) for s in items]
    except (TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{source}: the recorded input shape {value!r} is not a list of sizes") from exc


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Like ``python -m``: let the current directory's packages be imported for a while."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Import the factory named by ``package.module:factory`` or ``path/to/file.py:factory``.

    This runs that module's code: only the module the user named is imported.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--arch {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            file = Path(module_name)
            if not file.is_file():
                raise UsageError(f"--arch {spec!r}: file {file} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"bnfold_arch_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            with _cwd_importable():
                module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--arch {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--arch {spec!r}: {module_name} has no callable named {attr!r}")
    return factory


def _safe_numpy_globals() -> list[Any]:
    """Harmless numpy types that checkpoints often hold (scalars, dtypes), allowed when unpickling."""
    allowed: list[Any] = [np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(mod_name)
            allowed += [mod.scalar, mod._reconstruct]
            break
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def _sniff(path: Path) -> str:
    """The format of ``path`` from its content: one of the module constants, or 'pickle'."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ModelLoadError(f"{path} is a damaged archive ({exc}); re-download or re-save the model") from exc
        if bad is not None:
            raise ModelLoadError(f"{path} is a damaged archive (member {bad} fails its checksum); re-download or re-save it")
        if any(n.endswith("/archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
            return EXPORTED_PROGRAM
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n.endswith("/data.pkl") for n in names):
            return "pickle"
        raise ModelLoadError(f"{path} is a zip archive but not a PyTorch model (no TorchScript code, export program or data.pkl)")
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    kind = "a text or JSON file" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "of an unknown format"
    raise ModelLoadError(
        f"{path} is not a PyTorch model file (it is {kind}); expected a TorchScript archive "
        "(torch.jit.save), a torch.export program (torch.export.save) or a torch.save checkpoint"
    )


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def _load_pickled(path: Path, trust_pickle: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {str(exc).splitlines()[0]}") from exc
        if not trust_pickle:
            wanted = _unsafe_globals(path)
            listed = ", ".join(wanted[:8]) + (f" and {len(wanted) - 8} more" if len(wanted) > 8 else "")
            raise UnsafeModelError(
                f"{path} is a pickled Python object that would import {listed or 'arbitrary Python code'}; "
                "unpickling it can run any code. If you trust this file, re-run with --trust-pickle "
                "(Python: trust_pickle=True); better, save a state_dict and pass --arch, or save "
                "with torch.jit.save / torch.export.save"
            ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    try:
        with _cwd_importable(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: unpickling the trusted file failed: {type(exc).__name__}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _apply_state_dict(path: Path, state: Mapping[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any] | None) -> nn.Module:
    factory = resolve_factory(arch)
    try:
        module = factory(**dict(arch_kwargs or {}))
    except Exception as exc:
        raise UsageError(f"--arch {arch!r}: calling it with {dict(arch_kwargs or {})} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise UsageError(f"--arch {arch!r} returned {type(module).__name__}, not a torch.nn.Module")
    expected = module.state_dict()
    for prefix in WRAPPER_PREFIXES:  # saved from DataParallel / torch.compile
        if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    # torch itself accepts batch-norms without num_batches_tracked (older checkpoints).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (file vs arch)", mismatched))
        if keys
    ]
    if problems:
        raise ModelLoadError(f"{path} does not match --arch {arch}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _file_metadata(loaded: LoadedModel, meta: Mapping[str, Any]) -> LoadedModel:
    """Input shapes, labels and preprocessing recorded in a checkpoint dict or ``bnfold.json``."""
    for key in INPUT_SHAPE_KEYS:
        if key in meta:
            loaded.input_shapes = _shapes_from(meta[key], str(loaded.path))
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
            raise ModelLoadError(f"{loaded.path}: its recorded labels are not a list of strings")
        loaded.labels = list(labels)
    if isinstance(meta.get("preprocess"), Mapping):
        try:
            loaded.preprocess = Preprocess.from_dict(dict(meta["preprocess"]))
        except UsageError as exc:
            raise ModelLoadError(f"{loaded.path}: its recorded preprocessing is invalid ({exc})") from exc
    return loaded


def _interpret(path: Path, obj: Any, arch: str | None, arch_kwargs: Mapping[str, Any] | None) -> LoadedModel:
    meta: Mapping[str, Any] = {}
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        meta = obj
        inner = next((obj[k] for k in STATE_DICT_KEYS if k in obj and (_is_state_dict(obj[k]) or isinstance(obj[k], nn.Module))), None)
        if inner is None:
            raise ModelLoadError(
                f"{path} is a checkpoint dict without a model: expected a state_dict under one of "
                f"{', '.join(STATE_DICT_KEYS)}; found keys {', '.join(map(str, list(obj)[:10]))}"
            )
        obj = inner
    if isinstance(obj, nn.Module):
        if arch:
            raise UsageError(f"{path} holds a whole module; --arch is only for state_dict files")
        return _file_metadata(LoadedModel(obj.eval(), path, PICKLED_MODULE), meta)
    if _is_state_dict(obj):
        if not arch:
            raise UsageError(
                f"{path} holds a state_dict ({len(obj)} tensors) but no architecture: pass "
                "--arch package.module:factory (and --arch-kwargs '{...}' if it takes arguments)"
            )
        return _file_metadata(LoadedModel(_apply_state_dict(path, obj, arch, arch_kwargs).eval(), path, STATE_DICT), meta)
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model, state_dict or checkpoint dict")


def _load_torchscript(path: Path) -> LoadedModel:
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable TorchScript archive: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return _file_metadata(LoadedModel(module.eval(), path, TORCHSCRIPT), _extra_file_json(path, extra))


def _extra_file_json(path: Path, extra: dict[str, Any]) -> dict[str, Any]:
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


def _load_exported_program(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {TORCHSCRIPT_META_FILE: ""}
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable torch.export program: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    vals = [n.meta.get("val") for n in placeholders]
    shapes = dtypes = None
    if vals and all(isinstance(v, torch.Tensor) for v in vals):
        shapes = [tuple(d if isinstance(d, int) else 1 for d in v.shape) for v in vals]
        dtypes = [v.dtype for v in vals]
    loaded = LoadedModel(program.module(), path, EXPORTED_PROGRAM, shapes, dtypes)
    return _file_metadata(loaded, _extra_file_json(path, extra))


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
    ``trust_pickle`` is true. Raises a :class:`~bnfold.errors.BnfoldError` subclass otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give the model file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); re-save or re-download the model")
    fmt = _sniff(path)
    if fmt == TORCHSCRIPT:
        loaded = _load_torchscript(path)
    elif fmt == EXPORTED_PROGRAM:
        loaded = _load_exported_program(path)
    else:
        loaded = _interpret(path, _load_pickled(path, trust_pickle), arch, arch_kwargs)
    if arch and fmt in (TORCHSCRIPT, EXPORTED_PROGRAM):
        raise UsageError(f"{path} is a {fmt} file that carries its own architecture; drop --arch")
    return loaded
