"""INT8 export: accuracy on the sample models, speed and size on ResNet-18/50-shaped models.

    python benchmarks/int8.py [--quick]      # from the repository root; JSON to benchmarks/int8_results.json

1. Every sample model exported with ``bnfold.export(..., int8=True, calibration=test.npz)``, with
   each calibration method: the INT8 report's top-1 agreement and SQNR on the held-out half of
   the test set, and the top-1 accuracy of the float32 PyTorch model and of the INT8 model in
   ONNX Runtime on that same half (pixel accuracy for the segmentation model).
2. ResNet-18- and ResNet-50-shaped models (224x224, random weights, non-trivial batch-norm
   statistics) timed by ``bnfold.bench.bench(..., int8=True)`` at batch 1 and 8: ONNX Runtime
   float32 (bnfold's export, default optimizations) against the same file quantized to INT8 as
   ``bnfold export --int8`` quantizes it, interleaved in one run, and both file sizes.

``--quick``: one sample model, one method, ResNet-18 only, fewer repeats.

    python benchmarks/int8.py --activations

instead times the ResNet-18-shaped model's float32 file against it quantized with uint8
activations (bnfold's choice) and with int8 activations, side by side: why bnfold uses uint8.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import MODELS

import bnfold
from bnfold.bench import FILE_FP32, FILE_INT8, ORT_BNFOLD, ORT_INT8, bench
from bnfold.defaults import CALIBRATION_METHODS
from bnfold.predictor import session_options
from bnfold.quantization.calibration import BatchReader, split_indices
from bnfold.user_module import run_eval

CALIBRATION_SAMPLES_224 = 64  # random-normal 224x224 samples: half calibrate (bench's split)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


def sample_accuracy(quick: bool) -> list[dict]:
    rows = []
    print(
        "| model | method | calibrate / held out | top-1 agreement | SQNR dB | max rel err | float32 acc | INT8 acc | drop (points) | float layers | size INT8/fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    metas = json.loads((ROOT / "sample_models" / "models.json").read_text())
    for meta in metas[:1] if quick else metas:
        folder = ROOT / "sample_models" / meta["name"]
        loaded = bnfold.load_model(folder / meta["file"], **meta["load"])
        test = np.load(folder / "test.npz")
        _, held_out = split_indices(len(test["x"]), None)
        x, y = test["x"][held_out], test["y"][held_out]
        fp32_acc = accuracy(run_eval(loaded.module, [torch.from_numpy(x)])[0].numpy(), y)
        for method in CALIBRATION_METHODS[:1] if quick else CALIBRATION_METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                result = bnfold.export(
                    loaded.module,
                    loaded.example_inputs(),
                    Path(tmp) / "m.onnx",
                    int8=True,
                    calibration=folder / "test.npz",
                    calibration_method=method,
                )
                session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
                int8_acc = accuracy(session.run(None, {session.get_inputs()[0].name: x})[0], y)
            report = result.int8_report
            (out,) = report.outputs
            agreement = "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.2f}%"
            floats = ", ".join(layer.name for layer in report.float_layers) or "none"
            print(
                f"| {meta['name']} | {method} | {report.calibration_samples} / {report.verification_samples} | "
                f"{agreement} | {out.sqnr_db:.1f} | {out.max_rel_error:.3f} | {100 * fp32_acc:.2f}% | "
                f"{100 * int8_acc:.2f}% | {100 * (fp32_acc - int8_acc):+.2f} | {floats} | "
                f"{report.int8_bytes / report.fp32_bytes:.2f} |",
                flush=True,
            )
            rows.append(
                {
                    "model": meta["name"],
                    "method": method,
                    "fp32_accuracy": fp32_acc,
                    "int8_accuracy": int8_acc,
                    "int8": report.to_dict(),
                }
            )
    return rows


def speed(quick: bool) -> list[dict]:
    rows = []
    print(
        "\n| model | fp32 ms (b1 / b8) | INT8 ms (b1 / b8) | INT8/fp32 latency (b1 / b8) | size fp32 -> INT8 (MB) | INT8/fp32 size |"
    )
    print("|---|---|---|---|---|---|")
    calibration = np.random.default_rng(0).standard_normal((CALIBRATION_SAMPLES_224, 3, 224, 224)).astype(np.float32)
    for name in ["resnet18"] if quick else ["resnet18", "resnet50"]:
        report = bench(
            MODELS[name](),
            (torch.randn(1, 3, 224, 224),),
            name=name,
            batch_sizes=(1, 8),
            repeats=5 if quick else 15,
            int8=True,
            calibration=calibration,
        )
        m, ratio = report.median_ms, report.ratios()["ORT bnfold INT8 / ORT bnfold default"]
        fp32, int8 = report.file_bytes[FILE_FP32], report.file_bytes[FILE_INT8]
        print(
            f"| {name} (224x224) | {m[ORT_BNFOLD][1]:.2f} / {m[ORT_BNFOLD][8]:.2f} | {m[ORT_INT8][1]:.2f} / "
            f"{m[ORT_INT8][8]:.2f} | {ratio[1]:.3f} / {ratio[8]:.3f} | {fp32 / 1e6:.1f} -> {int8 / 1e6:.1f} | "
            f"{int8 / fp32:.3f} |",
            flush=True,
        )
        rows.append(report.to_dict())
    return rows


def activation_types(repeats: int = 15) -> None:
    print("| ResNet-18-shaped | batch 1 ms | batch 8 ms | / float32 (b1 / b8) |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        bnfold.export(MODELS["resnet18"](), (torch.randn(1, 3, 224, 224),), fp32, verify=False)
        calibration = {"x": rng.standard_normal((32, 3, 224, 224)).astype(np.float32)}
        paths = {"float32": fp32}
        for name, activation in (("uint8 activations", QuantType.QUInt8), ("int8 activations", QuantType.QInt8)):
            paths[name] = Path(tmp) / f"{activation.name}.onnx"
            quantize_static(
                fp32,
                paths[name],
                BatchReader(calibration, None),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activation,
                weight_type=QuantType.QInt8,
            )
        options = session_options(True, spin_wait=False)
        sessions = {
            k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()
        }
        medians: dict[str, dict[int, float]] = {k: {} for k in sessions}
        for batch in (1, 8):
            feeds = {"x": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for session in sessions.values():
                session.run(None, feeds)
            for _ in range(repeats):
                for name, session in sessions.items():
                    t0 = time.perf_counter()
                    session.run(None, feeds)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            for name in sessions:
                medians[name][batch] = statistics.median(times[name])
    for name, by_batch in medians.items():
        ratio = " / ".join(f"{by_batch[b] / medians['float32'][b]:.3f}" for b in (1, 8))
        print(f"| {name} | {by_batch[1]:.2f} | {by_batch[8]:.2f} | {ratio} |")


def main() -> None:
    if "--activations" in sys.argv:
        activation_types()
        return
    quick = "--quick" in sys.argv
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU), {torch.get_num_threads()} threads")
    results = {"accuracy": sample_accuracy(quick), "speed": speed(quick)}
    (ROOT / "benchmarks" / "int8_results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
