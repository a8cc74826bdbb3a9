"""The one family of errors a user can cause, each with the exit code the CLI uses."""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Exit codes, documented in the README ("Exit codes").
EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERNAL = 4  # a bug: an exception that is not a BnfoldError reached the CLI
EXIT_OUTPUT = 5  # the output could not be written (OutputError)
EXIT_ROWS_FAILED = 6  # bnfold predict --ray: the output is written, but some of its rows failed
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT


class _Unset(enum.Enum):
    """No value: :class:`Param` names the parameter only (an enum, so that it survives pickling)."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


_NO_VALUE: Any = _Unset.UNSET


@dataclass(frozen=True)
class Param:
    """A library parameter named in an error message, or, with ``value``, the setting that would
    fix the problem (``Param("verify", False)``).

    Written in Python's spelling by the library (`` `rtol` ``, `` `verify=False` ``); the CLI
    writes its flag instead (``--rtol``, ``--no-verify``), from the option groups that own the flags.
    """

    name: str
    value: Any = _NO_VALUE

    def __str__(self) -> str:
        return f"`{self.name}`" if self.value is _NO_VALUE else f"`{self.name}={self.value!r}`"

    @property
    def has_value(self) -> bool:
        """Whether this names a setting (``name=value``), not only the parameter."""
        return self.value is not _NO_VALUE


Part = str | Param
"""A piece of an error message: text, or a parameter the message names."""

Label = Part | tuple[Part, ...]
"""What names a value's source at the start of an error message (``(Param("inputs"), " d.npz")``)."""


def label_parts(label: Label) -> tuple[Part, ...]:
    """``label`` as message parts."""
    return label if isinstance(label, tuple) else (label,)


class BnfoldError(Exception):
    """Base class of every error bnfold raises for a problem the user can fix.

    The message names the file, layer or parameter at fault and says what to do. It is given as
    parts: text and :class:`Param` (``UsageError(Param("rtol"), " must be non-negative")``), so
    that each front end names a parameter its own way: ``str(error)`` in Python's spelling,
    :meth:`render` with the CLI's flags.
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, *parts: Part) -> None:
        super().__init__(*parts)
        self.parts: tuple[Part, ...] = parts

    def __str__(self) -> str:
        return "".join(map(str, self.parts))

    def params(self) -> tuple[Param, ...]:
        """The parameters the message names, in order."""
        return tuple(part for part in self.parts if isinstance(part, Param))

    def render(self, spell: Callable[[Param], str | None]) -> str:
        """The message with each parameter written as ``spell`` writes it (``None``: the library's
        spelling)."""
        return "".join(part if isinstance(part, str) else spell(part) or str(part) for part in self.parts)

    def reworded(self, edit: Callable[[str], str], *more: Part) -> BnfoldError:
        """An error of the same class whose text parts went through ``edit``, with ``more`` parts
        appended; the parameters it names are kept."""
        error = copy.copy(self)
        error.parts = tuple(edit(part) if isinstance(part, str) else part for part in self.parts) + more
        error.args = error.parts
        return error


class UsageError(BnfoldError):
    """An option or argument is malformed or inconsistent."""

    exit_code = EXIT_USAGE


class ModelLoadError(BnfoldError):
    """A model file cannot be read, is not a model, or is unsafe to load."""


class UnsafeModelError(ModelLoadError):
    """A model file would run arbitrary code when loaded and was not trusted."""


class FoldError(BnfoldError):
    """Folding cannot proceed (corrupt statistics, overflow, untraceable model)."""


class ExportError(BnfoldError):
    """The folded model could not be exported to ONNX."""


class OutputError(ExportError):
    """The output could not be written (disk full, read-only file system, I/O error).

    Nothing is left under the target name.
    """

    exit_code = EXIT_OUTPUT


class VerificationError(BnfoldError):
    """The exported ONNX model does not match the original model."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, *parts: Part, report: object | None = None) -> None:
        super().__init__(*parts)
        self.report = report


def first_line(exc: BaseException, *, with_type: bool = False, lines: int = 1) -> str:
    """The first non-empty line of an exception's message (TorchScript puts it last), or its
    first ``lines`` lines joined by `` | ``; the class name when the message is empty.
    ``with_type``: prefixed with the class name (``ValueError: ...``) unless it already is."""
    found = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if found and "TorchScript interpreter" in found[0]:
        found = found[-1:]
    name = type(exc).__name__
    text = " | ".join(found[:lines])
    if not text:
        return name
    return f"{name}: {text}" if with_type and not text.startswith(f"{name}:") else text
