"""Fuzzing support: mutations of real model files, and a driver that runs the CLI over many files
in one process (``python tests/fuzzing.py CASES.json``), printing one JSON line per case.

The driver announces each case before running it and arms a watchdog, so a hang or a crash in
the parent's view names the file that caused it; it captures stderr at the file-descriptor
level, so messages that C++ code prints behind Python's back are seen too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import random
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MUTATIONS = ("truncate", "flip", "swap_members", "drop_member", "corrupt_member")
CASE_TIMEOUT_S = 120


def _members(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [(name, archive.read(name)) for name in archive.namelist()]
    except Exception:
        return None


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buf.getvalue()


def mutate(data: bytes, kind: str, a: int, b: int, c: int) -> bytes:
    """``data`` mutated by ``kind`` with parameters ``a``, ``b``, ``c`` (taken modulo what fits).

    truncate: cut at ``a``; flip: xor byte ``a`` with ``b`` (and byte ``c`` with 0xFF); the zip
    mutations rewrite the archive with valid checksums, so the damage reaches torch's readers:
    swap the contents of members ``a`` and ``b``, drop member ``a``, or xor byte ``b`` of member
    ``a``'s content with ``c``. A zip mutation of a file that is not a zip flips a byte instead.
    """
    if kind == "truncate":
        return data[: a % max(len(data), 1)]
    members = _members(data) if kind in ("swap_members", "drop_member", "corrupt_member") else None
    if members:
        i, j = a % len(members), b % len(members)
        if kind == "swap_members":
            members[i], members[j] = (members[i][0], members[j][1]), (members[j][0], members[i][1])
        elif kind == "drop_member":
            del members[i]
        else:
            content = bytearray(members[i][1])
            if content:
                content[b % len(content)] ^= (c % 255) + 1
            members[i] = (members[i][0], bytes(content))
        return _zip(members)
    out = bytearray(data)
    if out:
        out[a % len(out)] ^= (b % 255) + 1
        out[c % len(out)] ^= 0xFF
    return bytes(out)


def random_cases(
    samples: dict[str, tuple[Path, list[str]]], count: int, seed: int, folder: Path
) -> list[dict[str, Any]]:
    """``count`` mutated copies of the sample files written to ``folder``, with the CLI arguments for each."""
    rng = random.Random(seed)
    cases = []
    names = sorted(samples)
    for n in range(count):
        name = names[n % len(names)]
        source, extra = samples[name]
        kind = MUTATIONS[rng.randrange(len(MUTATIONS))]
        data = mutate(source.read_bytes(), kind, rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32))
        path = folder / f"{n:04d}-{name}-{kind}.bin"
        path.write_bytes(data)
        command = "export" if n % 4 == 3 else "inspect"
        out = ["-o", str(folder / f"{n:04d}.onnx"), "--no-verify"] if command == "export" else []
        cases.append({"file": str(path), "args": [command, str(path), *out, *extra]})
    return cases


@contextlib.contextmanager
def fd_stderr() -> Iterator[list[str]]:
    """Capture everything written to file descriptor 2 (Python and C++ alike) meanwhile."""
    captured: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def drive(cases: list[dict[str, Any]]) -> None:
    """Run the CLI on every case; print a START line, then a JSON result line, per case."""
    from bnfold.cli.main import main
    from click.testing import CliRunner

    for case in cases:
        print(json.dumps({"start": case["file"]}), flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        with fd_stderr() as raw:
            result = CliRunner().invoke(main, case["args"])
        faulthandler.cancel_dump_traceback_later()
        print(
            json.dumps({"file": case["file"], "exit": result.exit_code, "stderr": result.stderr, "fd_stderr": raw[0]}),
            flush=True,
        )


if __name__ == "__main__":
    drive(json.loads(Path(sys.argv[1]).read_text()))
