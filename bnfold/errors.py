"""The one family of errors a user can cause, each with the exit code the CLI uses."""

from __future__ import annotations

# Exit codes, documented in the README ("Exit codes").
EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERNAL = 4  # a bug: an exception that is not a BnfoldError reached the CLI
EXIT_OUTPUT = 5  # the output could not be written (OutputError)
EXIT_ROWS_FAILED = 6  # bnfold predict --ray: the output is written, but some of its rows failed
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT


class BnfoldError(Exception):
    """Base class of every error bnfold raises for a problem the user can fix.

    The message names the file, layer or parameter at fault and says what to do. The library
    speaks Python: a parameter, or a call that would fix the problem, is written in backticks
    (`` `rtol` must be non-negative``, ``pass `trust_pickle=True` ``); the CLI maps each such
    name to its flag in one place (``bnfold.cli.flags``).
    """

    exit_code: int = EXIT_BAD_INPUT


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

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
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
