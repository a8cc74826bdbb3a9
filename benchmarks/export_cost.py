"""The whole `bnfold export` (load, fold, export, verify) vs a bare `torch.onnx.export` call on a
ResNet-50-shaped model (3x224x224): wall time and peak resident memory, each in a fresh process.

    python benchmarks/export_cost.py          # from the repository root

The parent writes the checkpoint; each child imports torch, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), then runs one step. Memory is the peak RSS during the step minus the
RSS just before it, so it counts everything the step needs: the model's weights (built by the bare
step, loaded from the checkpoint by bnfold), the exporter's imports, serialisation and, for
bnfold, verification in ONNX Runtime. Time is the bare ``torch.onnx.export`` call alone, and
bnfold's whole load + fold + export + verify.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = str(ROOT / "benchmarks" / "models.py") + ":resnet50"


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> None:
    """Reset the process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, folder: str) -> None:
    """Run one step (see :data:`MODES`) and print its cost as JSON. ``bnfold-plain-writer`` replaces the
    streaming ONNX writer by one serialization of the whole model, to measure what streaming saves."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    checkpoint = Path(folder) / "resnet50.pt"
    _reset_peak()
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "bare":  # torch alone: nothing of bnfold (or onnxruntime) is imported
        from models import resnet50

        model = resnet50().eval()
        inputs = (torch.randn(2, 3, 224, 224),)  # batch 2: torch.export specialises a batch of 1
        t0 = time.perf_counter()  # the bare call alone
        torch.onnx.export(
            model,
            inputs,
            str(Path(folder) / "bare.onnx"),
            dynamo=True,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    else:
        import bnfold

        if mode == "bnfold-plain-writer":  # the alternative to the streaming writer: onnxscript's ir.save
            from onnxscript import ir

            from bnfold import staging

            staging.write_model = lambda model, fh: fh.write(ir.serde.serialize_model(model).SerializeToString())
        loaded = bnfold.load_model(checkpoint, arch=ARCH)
        bnfold.export(
            loaded.module, loaded.example_inputs(), Path(folder) / "bnfold.onnx", verify=mode != "bnfold-no-verify"
        )
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    print(
        json.dumps({"mode": mode, "seconds": seconds, "before_mb": before, "peak_mb": peak, "added_mb": peak - before})
    )


MODES = ("bare", "bnfold", "bnfold-no-verify", "bnfold-plain-writer")


def main(rounds: int = int(os.environ.get("ROUNDS", "7"))) -> None:
    """``rounds`` rounds of every step, interleaved, each in a fresh process; medians reported.
    The time ratio is taken per round (the two steps ran back to back) and its median reported:
    this machine's speed drifts by tens of percent over minutes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from models import resnet50

    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(
            {"state_dict": resnet50().state_dict(), "input_shape": [1, 3, 224, 224]}, Path(folder) / "resnet50.pt"
        )
        for _ in range(rounds):
            for mode in MODES:
                out = subprocess.run(
                    [sys.executable, __file__, mode, folder], capture_output=True, text=True, check=True
                )
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "before_mb", "peak_mb", "added_mb")}
        for mode, rs in runs.items()
    }
    print(f"medians of {rounds} fresh-process runs per step, interleaved")
    print("| step | seconds | RSS before (MB) | peak RSS (MB) | peak RSS added by the step (MB) |")
    print("|---|---|---|---|---|")
    for mode, r in med.items():
        print(f"| {mode} | {r['seconds']:.1f} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {r['added_mb']:.0f} |")
    ratios = [ours["seconds"] / bare["seconds"] for bare, ours in zip(runs["bare"], runs["bnfold"])]
    bare, ours = med["bare"], med["bnfold"]
    print(
        f"time ratio bnfold/bare: median of the per-round ratios {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; ratio of the medians "
        f"{ours['seconds'] / bare['seconds']:.2f}) (target <= 1.10); "
        f"peak-memory ratio: {ours['added_mb'] / bare['added_mb']:.2f} (target <= 1.5); "
        f"with a plain writer (one serialized copy of the model): {med['bnfold-plain-writer']['added_mb'] / bare['added_mb']:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
    else:
        main()
