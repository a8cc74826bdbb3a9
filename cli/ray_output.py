"""Ray's own output kept off the terminal of ``bnfold predict --ray`` and ``bnfold serve`` unless
``--verbose``: its informational log lines, and the lines it prints by itself, from Python or from
its C++ core, that tell a bnfold user nothing they can act on (Ray's session logs keep them). What
the prediction actors and replicas print, Ray's warnings and errors, and bnfold's own lines pass.

The lines Ray prints by itself are filtered at the file descriptors: stdout and stderr are read
through a pipe (a pseudo-terminal when they are a terminal, so that Ray Data still draws its
progress bars) by a thread that writes every line on, except those of :data:`NOISE`. A line is
held back only while its start could be one of them; other output, such as a progress bar
redrawn with ``\\r``, passes at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence

# Ray's informational loggers, quieted to warnings (Serve's "Started Serve in namespace ...",
# "Application 'bnfold' is ready at ...", Ray Data's execution plans and its progress logged
# every few seconds off a terminal) and Ray's notice that its token authentication is on.
QUIET_LOGGERS = {
    "ray.serve": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
# Lines Ray prints by itself that a bnfold user cannot act on (matched once colours are removed).
NOISE = (
    # The driver's C++ core, for every actor Ray Data starts: it passes the actor's arguments
    # through the object store and lets it restart (ray-project/ray#53727).
    re.compile(
        rb"^\[[^]]* E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and max_restarts > 0"
    ),
    # `serve.shutdown()` waits for Serve's controller until it is killed, and Ray reports the calls
    # the kill cut short (as from the raylet) as failed tasks to be retried.
    re.compile(rb"^\(raylet\) Task ServeController\.\w+ failed\. There are infinite retries remaining"),
)
# How a noise line can start: a C++ log line's timestamp, Ray's prefix for the raylet's messages
# (coloured on a terminal).
NOISE_STARTS = (b"[20", b"(raylet)", b"\x1b[33m(raylet)")
ANSI = re.compile(rb"\x1b\[[0-9;]*m")
# Seconds to wait for the last output once the command is done.
DRAIN_S = 5.0


@contextlib.contextmanager
def ray_output(verbose: bool) -> Iterator[None]:
    """Ray's output for the duration: all of it with ``verbose``, else without the informational
    loggers of :data:`QUIET_LOGGERS` and the lines of :data:`NOISE` (on stdout and stderr)."""
    if verbose:
        yield
        return
    quieted = {name: (logging.getLogger(name).level, _Below(level)) for name, level in QUIET_LOGGERS.items()}
    for name, (_, below) in quieted.items():
        logging.getLogger(name).setLevel(below.level)  # for its child loggers
        logging.getLogger(name).addFilter(below)  # stays when Ray sets the level again (``import ray.serve`` does)
    try:
        with filtered_fd(sys.stdout, NOISE), filtered_fd(sys.stderr, NOISE):
            yield
    finally:
        for name, (level, below) in quieted.items():
            logging.getLogger(name).removeFilter(below)
            logging.getLogger(name).setLevel(level)


class _Below(logging.Filter):
    """Drops the records below ``level``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextlib.contextmanager
def filtered_fd(stream, noise: Sequence[re.Pattern[bytes]]) -> Iterator[None]:
    """Everything written to the file descriptor of ``stream`` (by Python, C or C++ code of this
    process) passes, for the duration, through a thread that drops the lines matching ``noise``.
    A no-op where ``stream`` has no file descriptor (e.g. captured by a test runner) or where
    pseudo-terminals are unknown."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    if os.name != "posix":
        yield
        return
    stream.flush()
    original = os.dup(fd)
    reader, writer = _pair(fd)
    os.dup2(writer, fd)
    os.close(writer)
    forwarder = threading.Thread(target=_forward, args=(reader, original, noise), daemon=True, name="bnfold-output")
    forwarder.start()
    try:
        yield
    finally:
        stream.flush()
        os.dup2(original, fd)  # closes the last writer: the forwarder reads to the end and stops
        forwarder.join(DRAIN_S)
        os.close(original)
        if not forwarder.is_alive():
            os.close(reader)


def _pair(fd: int) -> tuple[int, int]:
    """(read end, write end) standing in for ``fd``: a pseudo-terminal of the same size when
    ``fd`` is a terminal (Ray Data draws progress bars only on one), a pipe otherwise."""
    if not os.isatty(fd):
        return os.pipe()
    import fcntl
    import termios

    controller, terminal = os.openpty()
    attributes = termios.tcgetattr(terminal)
    attributes[1] &= ~termios.OPOST  # bytes as written: no "\n" -> "\r\n"
    termios.tcsetattr(terminal, termios.TCSANOW, attributes)
    with contextlib.suppress(OSError):
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return controller, terminal


def _forward(reader: int, out: int, noise: Sequence[re.Pattern[bytes]]) -> None:
    """Copy ``reader`` to ``out`` until its end, without the lines matching ``noise``."""
    lines = LineFilter(noise)
    while True:
        try:
            data = os.read(reader, 1 << 16)
        except OSError:  # a pseudo-terminal whose last writer closed
            data = b""
        _write(out, lines.feed(data) if data else lines.pending)
        if not data:
            return


def _write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader of our output went away
        while data:
            data = data[os.write(fd, data) :]


class LineFilter:
    """Splits output into lines (ended by ``\\n`` or ``\\r``) and drops those matching ``noise``;
    a line is held back only while its start could be that of a noise line (:data:`NOISE_STARTS`)."""

    def __init__(self, noise: Sequence[re.Pattern[bytes]], starts: Sequence[bytes] = NOISE_STARTS) -> None:
        self.noise, self.starts = noise, starts
        self.pending = b""  # the start of a line that may be noise
        self.passing = False  # the current line is not noise: its bytes pass as they come

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (and of the bytes held back) can be written now."""
        out = []
        for piece in re.split(rb"(?<=[\r\n])", data):
            if not piece:
                continue
            ended = piece.endswith((b"\n", b"\r"))
            if self.passing:
                out.append(piece)
            else:
                self.pending += piece
                if ended:
                    if not self._is_noise(self.pending):
                        out.append(self.pending)
                    self.pending = b""
                elif not self._may_be_noise(self.pending):
                    out.append(self.pending)
                    self.pending, self.passing = b"", True
            if ended:
                self.passing = False
        return b"".join(out)

    def _may_be_noise(self, start: bytes) -> bool:
        return any(s.startswith(start) or start.startswith(s) for s in self.starts)

    def _is_noise(self, line: bytes) -> bool:
        plain = ANSI.sub(b"", line)
        return any(pattern.search(plain) for pattern in self.noise)
