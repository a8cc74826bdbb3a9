"""The whole `bnfold export` (load, fold, export, verify) vs a bare `torch.onnx.export` call on a
ResNet-50-shaped model (3x224x224): wall time and peak resident memory, each in a fresh process.

    python benchmarks/export_cost.py          # from the repository root

Each child process builds the model, saves/loads what it needs, then measures only the export
step; peak memory is the process's max RSS minus its RSS just before that step.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, folder: str) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import bnfold
    from bnfold.fold.capture import batch_dynamic_shapes, with_batch
    from bnfold.modes import quiet_torch
    from models import resnet50

    model = resnet50()
    checkpoint = Path(folder) / "resnet50.pt"
    torch.save({"state_dict": model.state_dict(), "input_shape": [1, 3, 224, 224]}, checkpoint)
    del model
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "bare":
        model = resnet50()
        inputs = with_batch((torch.randn(1, 3, 224, 224),), 2)
        t0 = time.perf_counter()  # the bare call alone
        with quiet_torch():
            torch.onnx.export(model, inputs, str(Path(folder) / "bare.onnx"), dynamo=True, verbose=False,
                              dynamic_shapes=batch_dynamic_shapes(model, inputs))  # fmt: skip
    else:
        loaded = bnfold.load_model(checkpoint, arch=str(ROOT / "benchmarks" / "models.py") + ":resnet50")
        bnfold.export(loaded.module, loaded.example_inputs(), Path(folder) / "bnfold.onnx", verify=mode == "bnfold")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mb": peak / 1024, "extra_mb": (peak - before) / 1024}))


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("bare", "bnfold", "bnfold-no-verify"):
            out = subprocess.run([sys.executable, __file__, mode, folder], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| step | seconds | peak RSS (MB) | RSS added by the step (MB) |")
    print("|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |")
    bare, ours = results["bare"], results["bnfold"]
    print(f"time ratio bnfold/bare: {ours['seconds'] / bare['seconds']:.2f} (target <= 1.5); "
          f"added-memory ratio: {ours['extra_mb'] / bare['extra_mb']:.2f} (target <= 2)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
    else:
        main()
