"""`bnfold serve`: a real server in a child process (its own local Ray) answering over loopback,
stopped cleanly by SIGTERM; option errors name the flags before anything starts."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bnfold.cli.main import main
from click.testing import CliRunner

import bnfold

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "sample_models" / "digits_cnn"
TOKEN = "cli-test-token-0123456789abcdef"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    loaded = bnfold.load_model(DIGITS / "model.pt")
    out = tmp_path_factory.mktemp("serve_cli") / "digits.onnx"
    bnfold.export(loaded.module, loaded.example_inputs(), out, verify=False)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bnfold_serve(*args: object) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bnfold.cli.main", "serve", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def lines_of(stream) -> queue.Queue:
    """The stream's lines, read in a thread (so waiting for one can time out)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def post(url: str, payload: object, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_with_a_token_and_stops_cleanly_on_sigterm(digits_onnx, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    server = bnfold_serve(digits_onnx, "--port", port, "--token-file", token_file, "--max-batch-size", 4)
    stdout, stderr = lines_of(server.stdout), lines_of(server.stderr)
    try:
        started = stdout.get(timeout=START_TIMEOUT_S)
        assert started and f"at http://127.0.0.1:{port} " in started and "bearer token required" in started
        x = np.load(DIGITS / "test.npz")["x"][:3]
        url = f"http://127.0.0.1:{port}/predict"
        assert post(url, {"inputs": x.tolist()}, {})[0] == 401
        status, body = post(url, {"inputs": x.tolist()}, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        expected = bnfold.Predictor(digits_onnx, device="cpu").predict(x)
        np.testing.assert_allclose(body["outputs"], expected, rtol=RTOL, atol=ATOL)

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    output = started + "".join(iter(stdout.get, None)) + "".join(iter(stderr.get, None))
    assert "bnfold: stopped" in output and TOKEN not in output
    # Nothing but bnfold's own lines: none of Ray's log lines (Serve's "Started Serve ...") nor the
    # failed-task lines of Serve's shutdown ("(raylet) Task ServeController.graceful_shutdown failed").
    assert [line for line in output.splitlines() if not line.startswith("bnfold: ")] == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command) of the processes below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        try:
            found.append((child, (Path("/proc") / str(child) / "cmdline").read_bytes().decode(errors="replace")))
        except OSError:
            continue
        pending += children.get(child, [])
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_serving_stops_the_start_up_with_130_and_leaves_nothing_running(digits_onnx, signum):
    # A replica needing 64 CPUs never starts: the server can only be interrupted before it serves.
    server = bnfold_serve(digits_onnx, "--port", free_port(), "--cpus-per-replica", 64)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("raylet" in command for _, command in descendants(server.pid)):  # Ray is starting
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            time.sleep(0.05)
        started = [pid for pid, _ in descendants(server.pid)]
        server.send_signal(signum)
        out, err = server.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode == 130, (out, err)
    assert out == ""
    assert err.strip().splitlines()[-1] == (
        "bnfold: error: interrupted before the model server was serving; what had started is stopped"
    )
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(running(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in started if running(pid)] == []


def test_a_port_in_use_is_refused_naming_the_flag_before_ray_starts(digits_onnx):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = bnfold_serve(digits_onnx, "--port", busy.getsockname()[1])
        _, err = server.communicate(timeout=120)
    assert server.returncode == 2 and "cannot listen on --host 127.0.0.1 --port" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "two"], "--replicas 'two' is not valid"),
        (["--replicas", "3,2"], "--replicas must be at least 1, or (min, max)"),
        (["--max-batch-size", "0"], "--max-batch-size must be positive"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must not be negative"),
        (["--max-body-mb", "0"], "--max-body-mb must be positive"),
        (["--body-timeout-s", "0"], "--body-timeout-s must be positive"),
        (["--cpus-per-replica", "0"], "--cpus-per-replica must be positive"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--port", "70000"], "--port must be between 0 and 65535 (got 70000)"),
        (["--port", "-1"], "--port must be between 0 and 65535 (got -1)"),
    ],
)
def test_bad_options_exit_2_naming_the_flag(args, message, tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "model.onnx"), *args])
    assert result.exit_code == 2 and message in result.stderr


def test_a_short_token_file_is_refused_naming_the_flag(tmp_path):
    (tmp_path / "token").write_text("Xq9z7\n")
    result = CliRunner().invoke(main, ["serve", "m.onnx", "--token-file", str(tmp_path / "token")])
    assert result.exit_code == 2 and "--token-file" in result.stderr and "Xq9z7" not in result.stderr


def test_without_ray_serve_installed_the_error_names_the_extra(digits_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["serve", str(digits_onnx)])
    assert result.exit_code == 2 and "pip install 'bnfold[ray]'" in result.stderr


def test_serving_every_interface_without_a_token_warns(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # stop right after the warning
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "m.onnx"), "--host", "0.0.0.0"])
    assert "warning: serving on 0.0.0.0 without --token-file" in result.stderr
