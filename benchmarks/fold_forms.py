"""Batch-norm and affine nodes left in the ONNX graph, per fold form of issue 12: a plain
``torch.onnx.export`` (its optimizer folds simple Conv + BatchNormalization pairs) vs
``bnfold export``, on the test blocks of ``tests/folding/rules/``.

    python benchmarks/fold_forms.py          # from the repository root
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in ("", "tests", "tests/folding", "tests/folding/rules"):
    sys.path.insert(0, str(ROOT / folder))

import test_affine as affine
import test_multibranch_library_forms as forms
import test_through_ops as through
from fold_checks import with_statistics

import bnfold
from bnfold.user_module import quiet_torch

COUNTED = ("BatchNormalization", "Mul", "Add", "Sub", "Div", "Conv", "Gemm")
C = forms.C
FORMS = {
    "in-place RepVGG after relu_, drop_path": (lambda: with_statistics(forms.InPlaceRepVGG()), (2, C, 8, 8)),
    "MobileOne branches summed from 0": (lambda: with_statistics(forms.MobileOneStyle()), (2, C, 8, 8)),
    "BN after the sum of branches": (lambda: with_statistics(forms.BatchNormAfterSum()), (2, C, 8, 8)),
    "FastViT RepMixer (sub + layer scale)": (lambda: with_statistics(forms.RepMixer()), (2, C, 8, 8)),
    "conv -> FrozenBatchNorm2d": (
        lambda: with_statistics(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), affine.FrozenBatchNorm2d(4))),
        (2, 3, 6, 6),
    ),
    "ResNet block with FrozenBatchNorm2d": (lambda: with_statistics(affine.FrozenResNetBlock()), (2, 4, 6, 6)),
    "conv -> FrozenBN -> layer scale": (
        lambda: with_statistics(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), affine.FrozenBatchNorm2d(4), affine.LayerScale(4))
        ),
        (2, 3, 6, 6),
    ),
    "input normalisation -> unpadded conv": (lambda: with_statistics(affine.Normalised(padding=0)), (2, 3, 6, 6)),
    "BN -> global pool -> Linear head": (
        lambda: with_statistics(
            through.Head(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 4)
        ),
        (2, 4, 5, 5),
    ),
    "conv -> max-pool -> BN stem (positive scales)": (
        lambda: through.with_scale_signs(with_statistics(through.Stem()), negative=False),
        (2, 3, 6, 6),
    ),
}


def counts(path: Path) -> dict[str, int]:
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return {op: ops.count(op) for op in COUNTED}


def main() -> None:
    print("| form | plain torch.onnx.export: " + ", ".join(COUNTED) + " | bnfold: same |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (make, shape) in FORMS.items():
            model = make()
            x = torch.randn(*shape)
            plain, ours = Path(folder) / "plain.onnx", Path(folder) / "bnfold.onnx"
            with quiet_torch():
                torch.onnx.export(model, (x,), str(plain), dynamo=True, verbose=False)
            bnfold.export(model, (x[:1],), ours)
            before, after = counts(plain), counts(ours)
            print(
                f"| {name} | "
                + " / ".join(str(before[o]) for o in COUNTED)
                + " | "
                + " / ".join(str(after[o]) for o in COUNTED)
                + " |"
            )


if __name__ == "__main__":
    main()
