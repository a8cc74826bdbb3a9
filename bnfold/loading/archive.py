"""A ``torch.export`` archive (``.pt2``) checked for code before ``torch.export.load`` reads it.

``torch.export.load`` (torch 2.6-2.13) can run code from the file: it unpickles some members with
``weights_only=False`` (falling back to it when a safe load fails), evaluates shape expressions
with ``sympy.sympify`` (which calls ``eval``), compiles the recorded guards into Python, and
resolves node targets by attribute lookup under torch/_operator/math (which reaches
``os.system``). An untrusted archive is therefore checked statically first: only
ATen/prims/higher-order ops and plain arithmetic as node targets, expressions and guards in the
narrow grammars torch writes, and pickled members importing nothing outside the safe allow-list.

The pickled members are read with the opcode scan, not with
``torch.serialization.get_unsafe_globals_in_checkpoint``: they are bare pickles (``pickle.dumps``
objects, legacy ``torch.save`` files) or zips whose pickles torch's scanner does not all read.
"""

from __future__ import annotations

import io
import json
import operator
import posixpath
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, Param, UnsafeModelError
from .pickle_scan import pickle_globals
from .pickles import LEGACY_PICKLES, allowed_global_names, list_names

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


def safe_target(target: str) -> bool:
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
                if key in ("target", "as_operator") and isinstance(value, str) and not safe_target(value):
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
        return pickle_globals(fh, max_pickles=LEGACY_PICKLES)


def export_archive_problems(path: Path) -> list[str]:
    """What in a ``torch.export.save`` archive would run code from the file on ``torch.export.load``.

    Empty for archives that torch itself writes for ordinary models (see the module docstring).
    """
    problems: list[str] = []
    allowed = allowed_global_names()
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


def damaged_archive(path: Path, detail: str) -> ModelLoadError:
    """The error for a zip archive that cannot be read (``detail`` says why)."""
    return ModelLoadError(f"{path} is a damaged archive ({detail}); re-download or re-save the model")


def check_export_archive(path: Path) -> None:
    """An :class:`UnsafeModelError` if :func:`export_archive_problems` finds any, naming them."""
    try:
        problems = export_archive_problems(path)
    except Exception as exc:  # e.g. a damaged nested archive
        raise damaged_archive(path, f"{type(exc).__name__}: {exc}") from exc
    if problems:
        raise UnsafeModelError(
            f"{path} is a torch.export archive that would run code from the file when loaded "
            f"({list_names(problems, 3)}); torch.export.save does not write such archives. If you "
            "trust this file, pass ",
            Param("trust_pickle", True),
        )
