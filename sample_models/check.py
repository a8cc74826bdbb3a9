"""Export and verify every sample model on its test set and print the figures as a markdown table:
errors against the float32 original, normwise errors of the original and of the ONNX model
against a float64 run, and top-1 accuracy before and after.

    python -m sample_models.check        # from the repository root

The README's sample-model table is this script's output.
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

import bnfold
from bnfold.user_module import run_eval

ROOT = Path(__file__).resolve().parent


def main() -> None:
    metas = json.loads((ROOT / "models.json").read_text())
    print(f"torch {torch.__version__}, onnxruntime CPU, {platform.machine()}, {torch.get_num_threads()} threads")
    print(
        "| model | format | BN | folded | kept | max abs err | max rel err | fp32 vs f64 | ONNX vs f64 | top-1 before | top-1 after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for meta in metas:
            folder = ROOT / meta["name"]
            loaded = bnfold.load_model(folder / meta["file"], **meta["load"])
            result = bnfold.export(
                loaded.module, loaded.example_inputs(), Path(tmp) / "m.onnx", inputs=folder / "test.npz"
            )
            test = np.load(folder / "test.npz")
            before = run_eval(loaded.module, [torch.from_numpy(test["x"])])[0].numpy().argmax(1)
            after = bnfold.Predictor(result.path, device="cpu").predict(test["x"]).argmax(1)
            check = result.verify_report.outputs[0]
            f64 = bnfold.verify(loaded.module, result.path, folder / "test.npz", reference="float64").outputs[0]
            r = result.fold_report
            print(
                f"| {meta['name']} | {loaded.format} | {len(r.entries)} | {r.folded_count} | {r.kept_count} | "
                f"{check.max_abs_error:.2e} | {check.max_rel_error:.2e} | "
                f"{f64.float64_rel_error_original:.2e} | {f64.float64_rel_error_onnx:.2e} | "
                f"{(before == test['y']).mean():.4f} | {(after == test['y']).mean():.4f} |"
            )


if __name__ == "__main__":
    main()
