"""Staged, atomic writes: a file appears complete under its name or not at all.

Every write goes to a temporary name in the target's folder and is renamed into place only when
complete (and, for an exported model, verified); a write failure (disk full, read-only file
system) is an :class:`~bnfold.errors.OutputError`, and nothing is left behind, not even on Ctrl-C.
What appears under the target name has the modes of a file or folder created there directly (the
umask's), not the owner-only modes of a temporary one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import ExportError, OutputError, Param, Part, UsageError

if TYPE_CHECKING:  # onnxscript takes a second to import: only where an ONNX model is saved
    from onnxscript import ir

# The umask is read from here where the kernel reports it (Linux 4.7+), without changing it.
PROC_STATUS = Path("/proc/self/status")
_UMASK_LOCK = threading.Lock()

# Protobuf cannot serialize a message of 2 GiB or more: models whose tensors exceed this many bytes
# are written with their tensors in a separate file, ``<name>.onnx.data`` beside ``<name>.onnx``.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# The parameter that names an output file.
PATH = Param("path")


def check_output_path(
    path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None, option: Part = PATH
) -> Path:
    """The output path, checked: its folder exists and is writable, it is not the input, and it
    is a regular file if it exists (writing "onto" a device such as /dev/full would replace it)."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist; create it or choose another ", option)
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable; choose another ", option)
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not out.is_file():
        raise UsageError(
            f"output {out} exists and is not a regular file (a device, pipe or socket); choose another ", option
        )
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise UsageError(f"output {out} is the input model file; choose another ", option)
    return out


def external_data_path(out: str | os.PathLike[str]) -> Path:
    """Where the tensors of a model written with external data go: ``<out>.data`` beside ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".data")


def write_failed(out: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {out}: {reason}; nothing was written. Free some space or write elsewhere")


def current_umask() -> int:
    """The process's file-mode creation mask. Linux reports it in ``/proc/self/status``; elsewhere
    it can only be read by setting it, which affects the whole process for an instant: that is
    done under a lock, and restored at once."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike[str]) -> None:
    """Give a staged file or folder the mode it would have had if created directly under the
    umask (``0o666``/``0o777`` without the umask's bits): temporary files are created owner-only
    (``tempfile.mkstemp``: 0600, ``mkdtemp``: 0700) and keep that mode when renamed."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(fh)`` to a temporary file beside ``path``, then rename it.

    ``path`` holds either its old content or the complete new one; an :class:`OutputError` (disk
    full, read-only file system) or an interrupt leaves no temporary file behind.
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed(target, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        publish_mode(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise write_failed(target, exc) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


class Staged:
    """An ONNX file written under a temporary name in the target's folder, moved into place by
    :meth:`commit` only. A model over :data:`EXTERNAL_DATA_THRESHOLD` is written with external
    data into a temporary folder; :meth:`commit` moves the data file first and the ``.onnx``
    last, so a complete model appears under the target name or nothing does."""

    def __init__(self, out: Path, external: bool) -> None:
        self.out, self.external = out, external
        prefix = f".{out.name}."
        try:
            if external:
                self.folder: Path | None = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix, suffix=".tmp"))
                self.path = self.folder / out.name
            else:
                fd, name = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=".tmp")
                os.close(fd)
                self.folder, self.path = None, Path(name)
        except OSError as exc:
            raise write_failed(out, exc) from exc

    def save(self, model: ir.Model) -> None:
        """Serialize ``model`` to the temporary location (tensors to ``<name>.data`` if external)."""
        from .onnx_writer import save_with_external_data, write_model

        try:
            if self.external:
                save_with_external_data(model, self.path, external_data_path(self.out).name)
            else:
                with open(self.path, "wb") as fh:
                    write_model(model, fh)
        except OSError as exc:
            raise write_failed(self.out, exc) from exc
        except ValueError as exc:
            raise ExportError(f"cannot serialize the ONNX model for {self.out}: {exc}") from exc

    def commit(self, source: str | os.PathLike[str] | None) -> None:
        """Move the verified model into place: the data file (if any) first, the ``.onnx`` last."""
        data = external_data_path(self.out)
        if (
            self.external
            and source is not None
            and data.exists()
            and Path(source).exists()
            and os.path.samefile(data, source)
        ):
            raise UsageError(f"the external data file {data} would overwrite the input model; choose another ", PATH)
        try:
            if self.external:
                os.replace(self.path.with_name(data.name), data)
            try:
                publish_mode(self.path)
                os.replace(self.path, self.out)
            except OSError:
                if self.external:
                    data.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise write_failed(self.out, exc) from exc

    def cleanup(self) -> None:
        """Remove whatever is left of the temporary file or folder."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it: for steps that must not be cut in
    two (creating a temporary file and registering its removal), and for ``gc.collect()``, where
    a ``KeyboardInterrupt`` raised inside a finalizer is printed and ignored by Python. Outside
    the main thread, or under a non-default SIGINT handler, the block just runs."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def collect_garbage() -> None:
    """``gc.collect()`` with Ctrl-C held (see :func:`interrupts_held`)."""
    with interrupts_held():
        gc.collect()
