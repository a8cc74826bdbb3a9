"""Ray's own noise kept off the terminal: lines filtered at the file descriptor (C++ writes too),
progress redrawn with \\r passing at once, everything passing with --verbose."""

from __future__ import annotations

import logging
import os

import pytest
from bnfold.cli.ray_output import NOISE, LineFilter, filtered_fd, ray_output

CORE_WORKER = (
    b"[2026-12-03 15:45:36,620 E 24116 24116] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(PredictionActor))' and ID: '274ea8' has constructor arguments in the object store "
    b"and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    b"will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n"
)
SHUTDOWN = (
    b"\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries "
    b"remaining, so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.\n"
)
ACTOR = b"\x1b[36m(MapWorker(MapBatches(PredictionActor)) pid=1)\x1b[0m bnfold: prediction actor on vm: CPU\n"
REAL = [
    b"[2026-12-03 15:45:36,620 E 24116 24116] core_worker.cc:100: Failed to connect to the GCS\n",
    b"\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.\n",
    ACTOR,
]


def test_the_noise_lines_are_dropped_and_real_errors_and_actor_reports_pass():
    lines = LineFilter(NOISE)
    assert lines.feed(CORE_WORKER + REAL[0] + SHUTDOWN + REAL[1] + ACTOR) == b"".join(REAL)


def test_a_line_is_held_back_only_while_it_may_be_noise():
    lines = LineFilter(NOISE)
    assert lines.feed(b"\rRunning: 10%|#") == b"\rRunning: 10%|#"  # a progress bar passes at once
    assert lines.feed(b"#   |") == b"#   |"
    assert lines.feed(b"\r[20") == b"\r"  # may be a C++ log line: held
    assert lines.feed(b"26-12-03 15:45:36,620 E 1 1] core_worker.cc:1: Actor with class name: x") == b""
    assert lines.feed(b" has constructor arguments in the object store and max_restarts > 0.\n") == b""
    assert lines.feed(b"\x1b[3") == b""
    assert lines.feed(b"6m(MapWorker pid=1)\x1b[0m hello") == b"\x1b[36m(MapWorker pid=1)\x1b[0m hello"
    assert lines.feed(b" world\n") == b" world\n"


def test_what_any_code_writes_to_the_descriptor_is_filtered(tmp_path):
    with open(tmp_path / "out", "wb") as stream, filtered_fd(stream, NOISE):
        os.write(stream.fileno(), CORE_WORKER[:40])  # as C++ writes, in pieces
        os.write(stream.fileno(), CORE_WORKER[40:] + REAL[0])
        os.write(stream.fileno(), b"last line without an end")
    assert (tmp_path / "out").read_bytes() == REAL[0] + b"last line without an end"


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_shows_ray_s_informational_lines(verbose, caplog):
    with caplog.at_level(logging.INFO), ray_output(verbose):
        logging.getLogger("ray.serve").info("Started Serve in namespace 'serve'.")
        logging.getLogger("ray.data.dataset").info("Execution plan of Dataset ...")
        logging.getLogger("ray.serve").warning("a warning")
    messages = [record.getMessage() for record in caplog.records]
    assert ("Started Serve in namespace 'serve'." in messages) is verbose
    assert ("Execution plan of Dataset ..." in messages) is verbose
    assert "a warning" in messages


def test_a_terminal_stays_a_terminal_of_the_same_size(tmp_path):
    import fcntl
    import termios

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, bytes([24, 0, 132, 0, 0, 0, 0, 0]))  # 24 rows, 132 columns
    with open(terminal, "wb", closefd=False) as stream:
        with filtered_fd(stream, NOISE):
            assert os.isatty(stream.fileno())  # Ray Data draws its progress bars
            assert os.get_terminal_size(stream.fileno()) == (132, 24)
            os.write(stream.fileno(), CORE_WORKER + REAL[0])
        os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal end is closed and everything read
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert seen == REAL[0].replace(b"\n", b"\r\n")  # the terminal's own newline translation, once
