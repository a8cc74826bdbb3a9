"""float16 accuracy: bnfold (fold in float64, then cast) vs cast-then-fold.

    python benchmarks/fp16_error.py          # from the repository root

For every sample model (and one synthetic model with small running variances, where the order
matters most) this measures the normwise error ``max|y - y_ref| / max|y_ref|`` against the
float32 eval-mode model on the model's test set, for:

- bnfold: ``bnfold.export(..., fp16=True, keep_io_types=True)``, run in ONNX Runtime (CPU);
- cast-then-fold: the *unfolded* model converted to float16 and exported with torch's default
  ``torch.onnx.export`` (whose optimizer folds Conv/Gemm + BatchNormalization on the float16
  initializers), then run in ONNX Runtime with its default optimizations (which fuse what is left).

The last column is the ratio cast-then-fold / bnfold (> 1: bnfold is more accurate).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxscript import ir
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bnfold
from bnfold.exporting import output_count, to_onnx
from bnfold.folding.capture import capture
from bnfold.folding.precision import to_float16, with_float32_io
from bnfold.user_module import run_eval


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def cast_then_fold(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    unfolded = with_float32_io(to_float16(capture(module, (example,)).module()))
    model = to_onnx(unfolded, (example,), outputs=output_count(unfolded), dynamic_batch=True, opset=None)
    ir.save(model, path)


def normwise(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def synthetic() -> tuple[nn.Module, np.ndarray]:
    """A conv stack whose batch-norms have running variances down to 1e-4 and large gammas."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.copy_(10 ** torch.empty(32).uniform_(-4, 0))
            bn.running_mean.uniform_(-1, 1)
            bn.weight.uniform_(0.5, 4)
            bn.bias.uniform_(-1, 1)
    return model.eval(), np.random.default_rng(0).standard_normal((256, 3, 16, 16)).astype(np.float32)


def main() -> None:
    cases = []
    for meta in json.loads((ROOT / "sample_models" / "models.json").read_text()):
        folder = ROOT / "sample_models" / meta["name"]
        loaded = bnfold.load_model(folder / meta["file"], **meta["load"])
        cases.append((meta["name"], loaded.module, np.load(folder / "test.npz")["x"]))
    cases.append(("synthetic small-variance", *synthetic()))
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU)")
    print("| model | bnfold fp16 error | cast-then-fold fp16 error | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, x in cases:
            example = torch.from_numpy(x[:1])
            ref = run_eval(module, [torch.from_numpy(x)])[0].double().numpy()
            ours = Path(tmp) / "ours.onnx"
            bnfold.export(module, (example,), ours, fp16=True, keep_io_types=True, verify=False)
            theirs = Path(tmp) / "theirs.onnx"
            cast_then_fold(module, example, theirs)
            e_ours, e_theirs = normwise(ort_run(ours, x), ref), normwise(ort_run(theirs, x), ref)
            print(f"| {name} | {e_ours:.2e} | {e_theirs:.2e} | {e_theirs / e_ours:.2f} |", flush=True)


if __name__ == "__main__":
    main()
