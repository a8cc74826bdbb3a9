"""Predictor.predict vs a raw InferenceSession.run on the same session.

    python benchmarks/predictor_overhead.py          # from the repository root

For a sample model (shapes_resnet, 3x16x16) and a ResNet-50-shaped model (3x224x224, random
weights), at batch 1 and 64: the median wall time of ``predictor.predict(x)`` and of
``predictor.session.run(None, {name: x})`` (the very same ONNX Runtime session, so only bnfold's
input checks, batching and output handling differ), measured interleaved after warm-up.
The last line is the largest overhead ratio (target: <= 1.03).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import resnet50

import bnfold

# (batch, repeats) per model: enough repeats for a stable median within a few minutes on 2 cores.
PLAN = {"shapes_resnet": [(1, 1000), (64, 100)], "resnet50 (224x224)": [(1, 40), (64, 11)]}


def measure(predictor: bnfold.Predictor, x: np.ndarray, repeats: int) -> tuple[float, float]:
    feeds = {predictor.inputs[0].name: x}
    for _ in range(3):  # warm-up
        predictor.predict(x)
        predictor.session.run(None, feeds)
    raw, wrapped = [], []
    for i in range(repeats):
        for which in (0, 1) if i % 2 else (1, 0):  # alternate the order
            t0 = time.perf_counter()
            if which:
                predictor.predict(x)
            else:
                predictor.session.run(None, feeds)
            (wrapped if which else raw).append(time.perf_counter() - t0)
    return statistics.median(raw), statistics.median(wrapped)


def main() -> None:
    print(f"onnxruntime {ort.__version__} CPU, {torch.get_num_threads()} threads")
    print("| model | batch | raw session.run (ms) | Predictor.predict (ms) | ratio |")
    print("|---|---|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        sample = bnfold.load_model(ROOT / "sample_models" / "shapes_resnet" / "model.pt2")
        paths = {
            "shapes_resnet": bnfold.export(
                sample.module, sample.example_inputs(), Path(tmp) / "s.onnx", verify=False
            ).path,
            "resnet50 (224x224)": bnfold.export(
                resnet50(), (torch.randn(1, 3, 224, 224),), Path(tmp) / "r.onnx", verify=False
            ).path,
        }
        for name, path in paths.items():
            predictor = bnfold.Predictor(path, device="cpu")
            shape = tuple(d for d in predictor.inputs[0].shape[1:])
            for batch, repeats in PLAN[name]:
                x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
                raw, wrapped = measure(predictor, x, repeats)
                worst = max(worst, wrapped / raw)
                print(f"| {name} | {batch} | {raw * 1e3:.3f} | {wrapped * 1e3:.3f} | {wrapped / raw:.3f} |", flush=True)
    print(f"largest overhead ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
