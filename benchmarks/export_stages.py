"""Where the time and memory of `bnfold export` go, stage by stage, on the ResNet-50-shaped model.

    python benchmarks/export_stages.py          # from the repository root

One fresh process: writes a checkpoint, then loads it and exports it with verification, recording
wall time, resident memory and the peak during each stage (the peak mark is reset at each stage's
start, see ``export_cost.py``). Stages are bnfold's own progress steps; "between" is what runs
between two steps (freeing the folded weights, creating the ONNX Runtime session).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from export_cost import ARCH, _reset_peak, _status_mb
from models import resnet50

import bnfold
from bnfold.progress import Progress


class StageRecorder(Progress):
    """Records (stage, seconds, RSS at the end, peak RSS during the stage) for every step and gap."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []
        self.step = "load"
        self._begin()

    def _begin(self) -> None:
        _reset_peak()
        self.t0 = time.perf_counter()

    def _end(self, name: str) -> None:
        self.rows.append((name, time.perf_counter() - self.t0, _status_mb("VmRSS"), _status_mb("VmHWM")))

    def start(self, step: str) -> None:
        self._end(f"between ({self.step} → {step})" if self.rows else self.step)
        self.step = step
        self._begin()

    def finish(self) -> None:
        self._end(self.step)
        self._begin()


def child(checkpoint: Path) -> None:
    """Load and export ``checkpoint`` in this (fresh) process, printing the stage table."""
    base = _status_mb("VmRSS")
    recorder = StageRecorder()
    loaded = bnfold.load_model(checkpoint, arch=ARCH)
    bnfold.export(loaded.module, loaded.example_inputs(), checkpoint.with_suffix(".onnx"), progress=recorder)
    recorder.start("done")
    print(f"RSS before loading: {base:.0f} MB; RSS and peaks below are relative to it")
    print("| stage | seconds | RSS at its end (MB) | peak RSS during it (MB) |")
    print("|---|---|---|---|")
    for name, seconds, rss, peak in recorder.rows:
        if name.startswith("between") and seconds < 0.01:
            continue
        print(f"| {name} | {seconds:.2f} | {rss - base:.0f} | {peak - base:.0f} |")
    print(f"total: {sum(r[1] for r in recorder.rows):.1f} s")


def main() -> None:
    """Write the checkpoint here, measure in a fresh process (no memory left over from writing it)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "resnet50.pt"
        torch.save({"state_dict": resnet50().state_dict(), "input_shape": [1, 3, 224, 224]}, checkpoint)
        subprocess.run([sys.executable, __file__, str(checkpoint)], check=True)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        child(Path(sys.argv[1]))
    else:
        main()
