"""Fuzzing the loader and the CLI with random bytes and mutations of the real sample files
(truncation, flipped bytes, swapped, dropped and corrupted zip members): every outcome is a loaded
model or a BnfoldError (on the CLI: exit 0-3 with one error line), never another exception, a
hang or a crash. The default run is bounded (well under a minute); ``-m slow`` runs far more."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import MUTATIONS, mutate, random_cases
from hostile import DIGITS, MOBILENET, ROOT, SAMPLE_FILES, rewrite_zip
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bnfold
from bnfold.loading import load_model

# Prefixes that steer random bytes past format detection into each reader: zip archives, the
# legacy torch.save magic number, bare pickles, JSON.
PREFIXES = [
    b"",
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x80\x02",
    b"\x80\x04\x95",
    b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
    b"{",
]
SETTINGS = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None}
LOAD_TIMEOUT_S = 120
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _repo_root() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes() -> Iterator[None]:
    """Print what the in-process fuzzing produced (visible with ``pytest -s``)."""
    yield
    print(f"\nload_model fuzz outcomes: {dict(sorted(OUTCOMES.items()))}")


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The sample files, plus a legacy (non-zip) torch.save state_dict."""
    legacy = tmp_path_factory.mktemp("legacy") / "state_dict_legacy.pt"
    torch.save(torch.load(MOBILENET, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    return {**SAMPLE_FILES, "legacy": (legacy, SAMPLE_FILES["state_dict"][1])}


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """A hang becomes a crash with every thread's traceback, instead of a stuck test run."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def load_outcome(data: bytes, kwargs: dict[str, Any]) -> str:
    """Load ``data`` as a model file: "loaded" or the BnfoldError's class name. Any other
    exception propagates and fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.bin"
        path.write_bytes(data)
        with watchdog(LOAD_TIMEOUT_S):
            try:
                load_model(path, **kwargs)
                outcome = "loaded"
            except bnfold.BnfoldError as exc:
                outcome = type(exc).__name__
    OUTCOMES[outcome] += 1
    return outcome


mutations = st.tuples(
    st.sampled_from(sorted([*SAMPLE_FILES, "legacy"])),
    st.sampled_from(MUTATIONS),
    st.integers(0, 2**32),
    st.integers(0, 2**32),
    st.integers(0, 2**32),
)
random_files = st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=2048))


def check_mutation(samples, case) -> None:
    name, kind, a, b, c = case
    path, kwargs = samples[name]
    load_outcome(mutate(path.read_bytes(), kind, a, b, c), kwargs)


@settings(max_examples=150, derandomize=True, **SETTINGS)
@given(case=mutations)
@example(case=("torchscript", "flip", 3_596_037_686, 1, 296))  # found by the long run: a zlib.error escaped
def test_load_model_on_mutated_sample_files(samples, case):
    check_mutation(samples, case)


@settings(max_examples=300, derandomize=True, **SETTINGS)
@given(case=random_files)
def test_load_model_on_random_bytes(case):
    prefix, body = case
    assert load_outcome(prefix + body, {"arch": "sample_models.architectures:digits_cnn"}) != "loaded"


@pytest.mark.slow
@settings(max_examples=3000, **SETTINGS)
@given(case=mutations)
def test_load_model_on_mutated_sample_files_long(samples, case):
    check_mutation(samples, case)


@pytest.mark.slow
@settings(max_examples=5000, **SETTINGS)
@given(case=random_files)
def test_load_model_on_random_bytes_long(case):
    prefix, body = case
    assert load_outcome(prefix + body, {"arch": "sample_models.architectures:digits_cnn"}) != "loaded"


def test_damaged_torchscript_debug_info_does_not_crash_folding(tmp_path):
    """Found by the long CLI run: a damaged ``*.debug_pkl`` member (source ranges; valid checksum)
    loads, then torch segfaults printing a node while the model is converted for folding. Run in
    a subprocess, so a regression fails this test instead of killing the test run."""

    def damage(name: str, data: bytes) -> bytes:
        return data.replace(b"K\x01", b"K\xfe") if name.endswith(".debug_pkl") else data  # BININT1 1 -> 254

    path = rewrite_zip(DIGITS, tmp_path / "damaged.pt", damage)
    assert path.read_bytes() != DIGITS.read_bytes()
    code = (
        "import sys; from bnfold.loading import load_model; from bnfold.folding import fold; "
        "m = load_model(sys.argv[1]); print(fold(m.module, m.example_inputs()).report.summary())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 folded" in proc.stdout


# ------------------------------------------------------------------------------------- CLI
def cli_arguments(kwargs: dict[str, Any]) -> list[str]:
    args = ["--arch", kwargs["arch"]] if "arch" in kwargs else []
    return args + (["--arch-kwargs", json.dumps(kwargs["arch_kwargs"])] if "arch_kwargs" in kwargs else [])


def run_cli_fuzz(samples, tmp_path: Path, count: int, seed: int) -> Counter[int]:
    """Run the CLI over ``count`` mutated files in a subprocess; check each outcome."""
    cli_samples = {name: (path, cli_arguments(kwargs)) for name, (path, kwargs) in samples.items()}
    cases = random_cases(cli_samples, count, seed, tmp_path)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = [sys.executable, str(Path(__file__).with_name("fuzzing.py")), str(tmp_path / "cases.json")]
    proc = subprocess.run(driver, cwd=ROOT, capture_output=True, text=True, timeout=60 + count * 30)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    results = [line for line in lines if "exit" in line]
    assert proc.returncode == 0 and len(results) == count, (
        f"the CLI crashed or hung (exit {proc.returncode}) on {started[-1] if started else '?'}:\n{proc.stderr[-3000:]}"
    )
    codes: Counter[int] = Counter()
    for result in results:
        codes[result["exit"]] += 1
        assert result["exit"] in (0, 1, 2, 3), result
        assert result["fd_stderr"] == "", result  # nothing printed behind the CLI's back
        if result["exit"]:
            lines_ = result["stderr"].strip().splitlines()
            assert len(lines_) == 1 and lines_[0].startswith("bnfold: error: "), result
    print(f"\nCLI fuzz: {count} files, exit codes {dict(sorted(codes.items()))}")
    return codes


def test_cli_on_mutated_sample_files(samples, tmp_path):
    run_cli_fuzz(samples, tmp_path, count=24, seed=0)


@pytest.mark.slow
def test_cli_on_mutated_sample_files_long(samples, tmp_path):
    run_cli_fuzz(samples, tmp_path, count=400, seed=1)
