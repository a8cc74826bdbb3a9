"""Read a model file into an eval-mode module, safely: the format is detected from the content,
and nothing that can run arbitrary Python is unpickled unless the user trusts the file."""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import operator
import os
import pickle
import pickletools
import posixpath
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError, UnsafeModelError, UsageError
from .metadata import Preprocess
from .modes import first_line, quiet_torch

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


def parse_shape(text: str, option: str = "--input-shape", example: str = "1x3x224x224") -> Shape:
    """Parse ``"1x3x224x224"`` into ``(1, 3, 224, 224)``; a :class:`UsageError` naming ``option``
    if malformed."""
    if not re.fullmatch(r"\s*[1-9]\d*(\s*[xX,]\s*[1-9]\d*)*\s*", text or ""):
        raise UsageError(f"{option} {text!r} is not valid: give positive sizes separated by 'x', e.g. {example}")
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


def _numpy_multiarray() -> Any:
    """numpy's ``multiarray`` module (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    raise ImportError("numpy has no multiarray module")  # pragma: no cover


# numpy dtype character codes of plain data: bool, signed/unsigned ints, floats, complex, str, bytes.
_DATA_DTYPE_CODES = "?bBhHiIlLqQefdgFDGUS"


def safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` may import beyond torch's own allow-list.

    Only plain data containers that checkpoints commonly hold: numpy scalars, arrays and dtypes of
    booleans, numbers, strings and bytes, and ``argparse.Namespace`` (training arguments). Building
    them runs no code from the file. numpy's module was renamed (``numpy.core`` ->
    ``numpy._core``); both spellings are accepted so checkpoints from either numpy load.
    """
    multiarray = _numpy_multiarray()
    allowed: list[Any] = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct, argparse.Namespace]
    for code in _DATA_DTYPE_CODES:
        if type(np.dtype(code)) not in allowed:
            allowed.append(type(np.dtype(code)))
    for old in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if old != multiarray.__name__:
            allowed += [(multiarray.scalar, f"{old}.scalar"), (multiarray._reconstruct, f"{old}._reconstruct")]
    return allowed


def _allowed_global_names() -> set[str]:
    """``module.name`` of every global a safe load may import: torch's allow-list plus :func:`safe_globals`."""
    names = set(torch._weights_only_unpickler._get_allowed_globals())
    for item in safe_globals():
        obj, name = item if isinstance(item, tuple) else (item, None)
        names.add(name or f"{obj.__module__}.{obj.__qualname__}")
    return names


# ------------------------------------------------------------------------------ pickle scanning
_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_GLOBAL_NAME = re.compile(r"[A-Za-z_][\w.]*")
COMPUTED_GLOBAL = "<a global whose name is computed while unpickling>"


def _python3_name(module: str, attr: str) -> str:
    """``module.attr`` as Python 3 imports it (protocol 0-2 pickles may use Python 2 names)."""
    module, attr = _compat_pickle.NAME_MAPPING.get(
        (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
    )
    return f"{module}.{attr}"


def pickle_globals(stream: IO[bytes], max_pickles: int = 1) -> set[str]:
    """Every ``module.name`` the pickles at the start of ``stream`` import, found without unpickling.

    Reads up to ``max_pickles`` consecutive pickles (the legacy ``torch.save`` format is five) with
    :func:`pickletools.genops`, which parses the same opcodes as the unpickler; parsing stops
    quietly at the first malformed opcode, keeping what was found before it (an unpickler would
    have imported those before failing). ``STACK_GLOBAL`` operands are followed through the memo;
    one whose name is not a literal string, and ``EXT*`` extension codes, are reported as
    :data:`COMPUTED_GLOBAL`.
    """
    found: set[str] = set()
    for _ in range(max_pickles):
        memo: dict[Any, Any] = {}
        pushed: list[Any] = []  # what each opcode pushed: a str for string literals, else None
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    if _GLOBAL_NAME.fullmatch(module) and _GLOBAL_NAME.fullmatch(attr):
                        found.add(_python3_name(module, attr))
                elif name == "STACK_GLOBAL":
                    module, attr = pushed[-2:] if len(pushed) >= 2 else [None, None]
                    ok = isinstance(module, str) and isinstance(attr, str)
                    found.add(f"{module}.{attr}" if ok else COMPUTED_GLOBAL)
                elif name.startswith("EXT"):
                    found.add(COMPUTED_GLOBAL)
                if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if name in _STRING_OPCODES and isinstance(arg, str) else None)
        except Exception:  # malformed or exhausted: the rest is not pickle data
            break
    return found


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickled file wants that a safe load does not allow, sorted."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                wanted: set[str] = set()
                for member in members:
                    with archive.open(member) as fh:
                        wanted |= pickle_globals(fh)
        else:
            with open(path, "rb") as fh:
                wanted = pickle_globals(fh, max_pickles=5)
    except (OSError, zipfile.BadZipFile, ValueError):
        return []
    return sorted(wanted - _allowed_global_names())


def _refusal_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only error (it wraps it in paragraphs of advice)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text) or re.search(
        r"(Unsupported [^\n]+|Trying to load [^\n]+)", text
    )
    line = match.group(1) if match else next((x for x in text.splitlines() if x.strip()), type(exc).__name__)
    return line.strip().rstrip(".")


def _list_names(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _sniff(path: Path) -> str:
    """The format of ``path`` from its content: one of the module constants, or 'pickle'."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                bad = archive.testzip()
        except Exception as exc:  # zipfile and zlib raise many types on damaged archives
            raise ModelLoadError(
                f"{path} is a damaged archive ({type(exc).__name__}: {exc}); re-download or re-save the model"
            ) from exc
        if bad is not None:
            raise ModelLoadError(
                f"{path} is a damaged archive (member {bad} fails its checksum); re-download or re-save it"
            )
        if any(n.endswith("/archive_format") for n in names) or any(
            "/models/" in n and n.endswith(".json") for n in names
        ):
            return EXPORTED_PROGRAM
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n.endswith("/data.pkl") for n in names):
            return "pickle"
        raise ModelLoadError(
            f"{path} is a zip archive but not a PyTorch model (no TorchScript code, export program or data.pkl)"
        )
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    kind = (
        "a text or JSON file" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "of an unknown format"
    )
    raise ModelLoadError(
        f"{path} is not a PyTorch model file (it is {kind}); expected a TorchScript archive "
        "(torch.jit.save), a torch.export program (torch.export.save) or a torch.save checkpoint"
    )


def _load_pickled(path: Path, trust_pickle: bool) -> Any:
    """Unpickle a ``torch.save`` file: ``weights_only`` with :func:`safe_globals`, or fully if trusted."""
    try:
        with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise _refusal(path, exc) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        with _cwd_importable(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: unpickling the trusted file failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _refusal(path: Path, exc: BaseException) -> ModelLoadError:
    """Why the safe load refused ``path``: the globals it wants, or the pickle feature it needs."""
    wanted = _unsafe_globals(path)
    if wanted:
        return UnsafeModelError(
            f"{path} is a pickled Python object that would import {_list_names(wanted)}; "
            "unpickling it can run any code. If you trust this file, re-run with --trust-pickle "
            "(Python: trust_pickle=True); better, save a state_dict and pass --arch, or save "
            "with torch.jit.save / torch.export.save"
        )
    return ModelLoadError(
        f"{path} cannot be read safely ({_refusal_reason(exc)}): it is damaged, or it needs a full "
        "unpickler. Re-save or re-download it (torch.save(model.state_dict())), or, only if you "
        "trust the file, re-run with --trust-pickle"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _apply_state_dict(
    path: Path, state: Mapping[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any] | None
) -> nn.Module:
    factory = resolve_factory(arch)
    try:
        module = factory(**dict(arch_kwargs or {}))
    except Exception as exc:
        raise UsageError(
            f"--arch {arch!r}: calling it with {dict(arch_kwargs or {})} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(f"--arch {arch!r} returned {type(module).__name__}, not a torch.nn.Module")
    expected = module.state_dict()
    stripped = True
    while stripped:  # saved from DataParallel / torch.compile, possibly both (_orig_mod.module.)
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    # torch itself accepts batch-norms without num_batches_tracked (older checkpoints).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs arch)", mismatched),
        )
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
        inner = next(
            (obj[k] for k in STATE_DICT_KEYS if k in obj and (_is_state_dict(obj[k]) or isinstance(obj[k], nn.Module))),
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
            raise UsageError(f"{path} holds a whole module; --arch is only for state_dict files")
        return _file_metadata(LoadedModel(obj.eval(), path, PICKLED_MODULE), meta)
    if _is_state_dict(obj):
        if not arch:
            raise UsageError(
                f"{path} holds a state_dict ({len(obj)} tensors) but no architecture: pass "
                "--arch package.module:factory (and --arch-kwargs '{...}' if it takes arguments)"
            )
        return _file_metadata(
            LoadedModel(_apply_state_dict(path, obj, arch, arch_kwargs).eval(), path, STATE_DICT), meta
        )
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model, state_dict or checkpoint dict")


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


# ------------------------------------------------------------------- torch.export archives
# torch.export.load (torch 2.6-2.13) can run code from the file: it unpickles some members with
# weights_only=False (falling back to it when a safe load fails), evaluates shape expressions
# with sympy.sympify (which calls eval), compiles the recorded guards into Python, and resolves
# node targets by attribute lookup under torch/_operator/math (which reaches os.system). An
# untrusted archive is therefore checked statically first: only ATen/prims/higher-order ops and
# plain arithmetic as node targets, expressions and guards in the narrow grammars torch writes,
# and pickled members importing nothing outside the safe allow-list.
_SAFE_OP_NAMESPACES = ("aten", "prims", "higher_order")
_SAFE_OPERATOR_FUNCTIONS = frozenset(
    [
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "lshift",
        "rshift",
        "truth",
        "matmul",
    ]
)
_SAFE_TORCH_FUNCTIONS = frozenset(
    ["sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "sym_sqrt", "_sym_sqrt"]
)
_SYMPY_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "floor",
        "ceiling",
        "sqrt",
        "oo",
        "zoo",
        "nan",
        "true",
        "false",
        "True",
        "False",
        "None",
        "Infinity",
        "NegativeInfinity",
        "Tuple",
    ]
)
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_EXPR_TOKEN = re.compile(
    rf"\s+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|'{_IDENTIFIER}'|{_IDENTIFIER}|\*\*|//|[-+*/%(),=<>!]=?|[&|~]"
)
_GUARD_TOKEN = re.compile(
    rf"\s+|L(?:\['{_IDENTIFIER}'\]|\[\d+\])+(?:\.(?:size|stride)\(\)(?:\[\d+\])?|\.storage_offset\(\))?"
    rf"|\d+|\*\*|//|[-+*/%(),<>]=?|[=!]=|\b(?:and|or|not|max|min|abs|True|False)\b"
)


def _sympy_name_allowed(name: str) -> bool:
    """Names a recorded shape expression may use: sympy/torch symbolic functions, assumptions, symbols."""
    from sympy.core.assumptions import _assume_defined
    from torch.utils._sympy import functions

    if "__" in name:
        return False
    return (
        name in _SYMPY_NAMES
        or name in _assume_defined
        or bool(re.fullmatch(r"[a-z]{1,4}\d+", name))
        or (name[:1].isupper() and isinstance(getattr(functions, name, None), type))
    )


def _tokens(text: str, grammar: re.Pattern[str]) -> list[str] | None:
    """``text`` split into tokens of ``grammar``, or None where something else appears."""
    tokens, pos = [], 0
    while pos < len(text):
        match = grammar.match(text, pos)
        if not match or match.end() == pos:
            return None
        tokens.append(match.group())
        pos = match.end()
    return tokens


def _safe_expression(text: str) -> bool:
    """Whether a shape expression (``expr_str``, given to ``sympy.sympify``) is plain arithmetic."""
    tokens = _tokens(text, _EXPR_TOKEN)
    return tokens is not None and all(_sympy_name_allowed(t) for t in tokens if re.fullmatch(_IDENTIFIER, t))


def _safe_guard(text: str) -> bool:
    """Whether a guard (compiled into Python by ``ExportedProgram.module()``) only compares input sizes."""
    return _tokens(text, _GUARD_TOKEN) is not None


def _safe_target(target: str) -> bool:
    """Whether a graph node target (or operator argument) names an ATen/prims/higher-order op or plain arithmetic."""
    parts = target.split(".")
    if "__" in target or not all(re.fullmatch(_IDENTIFIER, p) for p in parts):
        return False
    if parts[:2] == ["torch", "ops"]:
        return len(parts) in (4, 5) and parts[2] in _SAFE_OP_NAMESPACES
    if len(parts) != 2:
        return False
    if parts[0] == "_operator":
        return parts[1] in _SAFE_OPERATOR_FUNCTIONS and callable(getattr(operator, parts[1], None))
    if parts[0] == "math":
        return not parts[1].startswith("_")
    return parts[0] == "torch" and parts[1] in _SAFE_TORCH_FUNCTIONS


def _json_code_problems(doc: Any) -> Iterator[str]:
    """Everything in a torch.export JSON document that torch would run or evaluate and that is unsafe."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in ("target", "as_operator") and isinstance(value, str) and not _safe_target(value):
                    yield f"calls {value}"
                elif key == "expr_str" and isinstance(value, str) and not _safe_expression(value):
                    yield f"evaluates the shape expression {value[:80]!r}"
                elif key == "guards_code":
                    guards = value if isinstance(value, list) else [value]
                    yield from (
                        f"compiles the guard {str(g)[:80]!r}"
                        for g in guards
                        if not (isinstance(g, str) and _safe_guard(g))
                    )
                else:
                    stack.append(value)


def _raw_tensor_members(archive: zipfile.ZipFile, names: Iterable[str]) -> set[str]:
    """Members that torch reads only as raw tensor bytes (``frombuffer``), never unpickles: those
    a weights/constants config declares with ``use_pickle: false`` (constants: ``tensor_`` files)
    and that no other entry declares otherwise."""
    raw: set[str] = set()
    unpickled: set[str] = set()
    for name in names:
        config_file = re.search(r"/data/(weights|constants)/[^/]+_config\.json$", name)
        if not config_file:
            continue
        folder, weights = name.rsplit("/", 1)[0], config_file.group(1) == "weights"
        try:
            declared = [
                (
                    posixpath.normpath(f"{folder}/{entry['path_name']}"),
                    entry["use_pickle"] is False and (weights or str(entry["path_name"]).startswith("tensor_")),
                )
                for entry in json.loads(archive.read(name))["config"].values()
            ]
        except (ValueError, KeyError, AttributeError, TypeError):
            continue  # unreadable: none of its members counts as raw, so all are scanned
        for member, is_raw in declared:
            (raw if is_raw else unpickled).add(member)
    return raw - unpickled


def _member_globals(archive: zipfile.ZipFile, name: str) -> set[str]:
    """Globals the pickle data in a member (a pickle stream, or a nested ``torch.save`` zip) imports."""
    with archive.open(name) as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(archive.read(name))) as nested:
            return set().union(*(pickle_globals(nested.open(n)) for n in nested.namelist() if n.endswith(".pkl")))
    with archive.open(name) as fh:
        return pickle_globals(fh, max_pickles=5)


def export_archive_problems(path: Path) -> list[str]:
    """What in a ``torch.export.save`` archive would run code from the file on ``torch.export.load``.

    Empty for archives that torch itself writes for ordinary models (see the comment above).
    """
    problems: list[str] = []
    allowed = _allowed_global_names()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        raw = _raw_tensor_members(archive, names)
        for name in names:
            if name.endswith(".json"):
                try:
                    doc = json.loads(archive.read(name))
                except ValueError:
                    continue  # torch.export.load reports malformed JSON itself
                problems += [f"{name} {p}" for p in _json_code_problems(doc)]
            elif name not in raw:
                problems += [f"{name} imports {g}" for g in sorted(_member_globals(archive, name) - allowed)]
    return problems


def _check_export_archive(path: Path) -> None:
    try:
        problems = export_archive_problems(path)
    except Exception as exc:  # e.g. a damaged nested archive
        raise ModelLoadError(
            f"{path} is a damaged archive ({type(exc).__name__}: {exc}); re-download or re-save the model"
        ) from exc
    if problems:
        raise UnsafeModelError(
            f"{path} is a torch.export archive that would run code from the file when loaded "
            f"({_list_names(problems, 3)}); torch.export.save does not write such archives. If you "
            "trust this file, re-run with --trust-pickle (Python: trust_pickle=True)"
        )


def _load_exported_program(path: Path, trust: bool) -> LoadedModel:
    if not trust:
        _check_export_archive(path)
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
    return _file_metadata(loaded, _extra_file_json(path, extra))


def _check_finite(loaded: LoadedModel) -> LoadedModel:
    """A :class:`ModelLoadError` naming the first parameter that holds NaN or inf."""
    for name, param in loaded.module.named_parameters():
        if param.dtype.is_floating_point:
            bad = int((~torch.isfinite(param.detach())).sum())
            if bad:
                raise ModelLoadError(
                    f"{loaded.path}: parameter '{name}' holds {bad} NaN/inf value(s) of {param.numel()}: "
                    "the checkpoint is corrupt or training diverged; restore an earlier checkpoint or re-train"
                )
    return loaded


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
    ``weights_only=True`` (plus :func:`safe_globals`), and ``torch.export`` archives are checked
    for code first (:func:`export_archive_problems`). ``arch`` imports and runs the module it names.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give the model file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); re-save or re-download the model")
    fmt = _sniff(path)
    if arch and fmt in (TORCHSCRIPT, EXPORTED_PROGRAM):
        raise UsageError(f"{path} is a {fmt} file that carries its own architecture; drop --arch")
    if fmt == TORCHSCRIPT:
        loaded = _load_torchscript(path)
    elif fmt == EXPORTED_PROGRAM:
        loaded = _load_exported_program(path, trust_pickle)
    else:
        loaded = _interpret(path, _load_pickled(path, trust_pickle), arch, arch_kwargs)
    return _check_finite(loaded)
