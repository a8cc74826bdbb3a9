"""Load: the Predictor called from 8 threads gives exactly the sequential results, and its resident
memory stays flat. The default run makes 8 x 10,000 calls; ``-m slow`` makes 8 x 100,000."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import DIGITS, run_cli

from bnfold.predictor import Predictor

THREADS = 8
STATUS = Path("/proc/self/status")
# Allowed resident-memory growth over a run, after a warm-up: a leak of 200 bytes per call over
# 80,000 calls exceeds it. The measured growth is far below (README, "Robustness and security").
RSS_BOUND = 16 * 2**20


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    out = tmp_path_factory.mktemp("load") / "digits.onnx"
    assert run_cli("export", DIGITS, "-o", out, "--no-verify").exit_code == 0
    return Predictor(out, device="cpu")


def hammer(
    predictor: Predictor, inputs: list[np.ndarray], expected: list[np.ndarray], calls_per_thread: int
) -> list[tuple[int, int]]:
    """``THREADS`` threads each make ``calls_per_thread`` predict calls over ``inputs``; the
    (thread, call) of every result that differs from the sequential one."""
    wrong: list[tuple[int, int]] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        start.wait()
        for i in range(calls_per_thread):
            k = (t * 7919 + i) % len(inputs)
            if not np.array_equal(predictor.predict(inputs[k]), expected[k]):
                wrong.append((t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wrong


def run_load(predictor: Predictor, total_calls: int) -> tuple[int, float]:
    """(resident-memory growth in bytes, seconds) of ``total_calls`` threaded calls, after a warm-up."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + k % 8, 1, 8, 8)).astype(np.float32) for k in range(64)]
    expected = [predictor.predict(x) for x in inputs]  # sequential
    assert hammer(predictor, inputs, expected, 200) == []  # warm-up: arenas and thread pools settle
    gc.collect()
    before, start = rss_bytes(), time.perf_counter()
    wrong = hammer(predictor, inputs, expected, total_calls // THREADS)
    seconds = time.perf_counter() - start
    gc.collect()
    growth = rss_bytes() - before
    assert wrong == [], f"{len(wrong)} threaded result(s) differ from the sequential ones"
    print(f"\n{total_calls} calls from {THREADS} threads: {seconds:.1f} s, RSS growth {growth / 2**20:+.2f} MiB")
    return growth, seconds


@pytest.mark.skipif(not STATUS.exists(), reason="reads resident memory from /proc")
def test_threads_match_sequential_and_memory_is_flat(predictor):
    growth, _ = run_load(predictor, THREADS * 10_000)
    assert growth < RSS_BOUND


@pytest.mark.slow
@pytest.mark.skipif(not STATUS.exists(), reason="reads resident memory from /proc")
def test_threads_match_sequential_and_memory_is_flat_long(predictor):
    growth, _ = run_load(predictor, THREADS * 100_000)
    assert growth < RSS_BOUND


def test_rss_probe_sees_an_allocation():
    """The probe itself can fail: 64 MiB of touched memory shows up in it."""
    before = rss_bytes()
    block = np.ones(16 * 2**20, dtype=np.float32)
    assert rss_bytes() - before > 60 * 2**20
    del block
