"""Choosing and creating the ONNX Runtime session: session options, execution providers, and
whether CUDA really works here (CPU otherwise, with the reason)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import BnfoldError, ModelLoadError, Param, UsageError, first_line

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

# CUDA provider options for dynamic batch sizes. cuDNN's default EXHAUSTIVE algorithm search
# benchmarks every convolution algorithm for each new input shape: with a dynamic batch axis every
# new batch size pays seconds of search before its first result. HEURISTIC picks an algorithm from
# cuDNN's heuristics without benchmarking, which is within a few percent of the best for common
# convolutions. kSameAsRequested stops the memory arena from doubling its allocation each time a
# larger batch arrives.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}


class CudaUnavailableWarning(UserWarning):
    """``device="auto"`` fell back to the CPU; the message says why."""


def session_options(optimize: bool = True, threads: int | None = None, spin_wait: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options: errors-only logging, graph optimizations on or off, the
    intra-op thread count, and whether idle threads spin-wait between runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: bnfold reports provider problems itself
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver library (hence possibly a GPU) is there to be used."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cuda_problem() -> str | None:
    """Why CUDA cannot be asked for at all, or None if it is worth trying."""
    if CUDA not in ort.get_available_providers():
        return (
            f"this onnxruntime build ({ort.__version__}) has no CUDA provider; "
            "install onnxruntime-gpu (and remove onnxruntime)"
        )
    if not nvidia_driver_present():
        return "no NVIDIA driver (libcuda) found: this machine has no usable GPU"
    return None


def create_session(
    path: str | os.PathLike[str], options: ort.SessionOptions, providers: Sequence[Any]
) -> ort.InferenceSession:
    """An ONNX Runtime session on ``path``; a :class:`ModelLoadError` if it cannot load it."""
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ModelLoadError(f"{path} cannot be loaded by ONNX Runtime: {first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet_cuda_attempt() -> Iterator[None]:
    """Hide onnxruntime's own messages while trying CUDA: bnfold reports the outcome itself."""
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)


def _preload_cuda_libraries() -> None:
    """Make the CUDA/cuDNN libraries of pip-installed torch/nvidia packages findable."""
    if hasattr(ort, "preload_dlls"):
        # Nothing to preload is fine: the session creation reports the real problem.
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def _cuda_session(path: Path, options: ort.SessionOptions) -> tuple[ort.InferenceSession | None, str | None]:
    """(a session running on CUDA, None), or (None, why CUDA does not work here)."""
    problem = cuda_problem()
    if problem is not None:
        return None, problem
    with _quiet_cuda_attempt():
        _preload_cuda_libraries()
        session = create_session(path, options, [(CUDA, CUDA_OPTIONS), CPU])
    if session.get_providers()[0] == CUDA:
        return session, None
    return None, (
        "onnxruntime could not start its CUDA provider: the CUDA or cuDNN libraries this "
        f"onnxruntime-gpu {ort.__version__} build needs were not found (`pip install "
        "'onnxruntime-gpu[cuda,cudnn]'` brings them), or no GPU is visible"
    )


def open_session(
    path: str | os.PathLike[str],
    options: ort.SessionOptions,
    *,
    device: str = "auto",
    providers: Sequence[Any] | None = None,
) -> tuple[ort.InferenceSession, str | None]:
    """The session for ``device`` and why it runs on the CPU when CUDA was wanted but does not work.

    ``device``: ``"cuda"`` (a :class:`BnfoldError` saying why not, if CUDA does not work),
    ``"cpu"``, or ``"auto"`` (CUDA when it really works, else the CPU and the reason).
    ``providers`` overrides the provider list entirely.
    """
    if device not in DEVICES:
        raise UsageError(Param("device"), f" must be one of {', '.join(map(repr, DEVICES))} (got {device!r})")
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} does not exist")
    if providers is not None:
        return create_session(path, options, providers), None
    if device == "cpu":
        return create_session(path, options, [CPU]), None
    session, problem = _cuda_session(path, options)
    if session is not None:
        return session, None
    if device == "cuda":
        raise BnfoldError(Param("device", "cuda"), f": {problem} (", Param("device", "auto"), " falls back to the CPU)")
    return create_session(path, options, [CPU]), problem


def placement(session: ort.InferenceSession) -> tuple[str, int]:
    """(``"cuda"`` or ``"cpu"``, the CUDA device id) of where ``session`` runs."""
    providers = session.get_providers()
    device = "cuda" if providers and providers[0] == CUDA else "cpu"
    return device, int(session.get_provider_options().get(CUDA, {}).get("device_id", 0))
