"""`bnfold bench`: a table of medians and ratios, JSON on request, one-line usage errors."""

from __future__ import annotations

import json
from pathlib import Path

from bnfold.cli.main import main
from click.testing import CliRunner

from bnfold.bench import VARIANTS

SIGNAL = Path(__file__).resolve().parents[2] / "sample_models" / "signal_cnn"
ARCH = str(SIGNAL.parent / "architectures.py") + ":signal_net"


def test_bench_prints_medians_and_ratios_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(SIGNAL / "model.pt"),
            "--arch",
            ARCH,
            "--batch-sizes",
            "1,4",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "ratios:" in result.stdout and "eager folded / BN-free floor" in result.stdout
    data = json.loads(out.read_text())
    assert set(data["median_ms"]) == set(VARIANTS) and data["batch_sizes"] == [1, 4]


def test_bench_rejects_bad_batch_sizes(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(SIGNAL / "model.pt"), "--arch", ARCH, "--batch-sizes", "0,4"])
    assert result.exit_code == 2 and "--batch-sizes" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_rejects_zero_repeats(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(SIGNAL / "model.pt"), "--arch", ARCH, "--repeats", "0"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--repeats must be at least 1 (got 0)" in result.stderr
