"""float64 arbitration on ill-conditioned networks: how far a correct export and a corrupted one
land from a float64 run, relative to the float32 original (README, "float64 arbitration").

    python benchmarks/float64_arbitration.py          # from the repository root

For 8 seeds of :func:`ill_conditioned`, exports the network with bnfold (no verification) and,
as the corrupted case, the same network with one batch-norm channel 0.1% off; then verifies both
against the correct network with ``reference="float64"`` and prints each normwise error and its
ratio to the float32 original's own error.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bnfold


def ill_conditioned(seed: int) -> nn.Module:
    """Linear (weights x100) -> BN -> Linear whose rows nearly cancel the first layer's range:
    outputs of ~1e-2 from activations of ~1e3, so float32 rounding alone moves them by ~1e-2
    relative, far above the default tolerance. Correct, just ill-conditioned."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(100)
        bn = model[1]
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        basis, _ = torch.linalg.qr((s[:, None] * model[0].weight).double())
        rows = torch.randn(8, 256, dtype=torch.float64)
        cancelling = rows - (rows @ basis) @ basis.T + 1e-5 * torch.randn(8, 256, dtype=torch.float64)
        model[2].weight.copy_(cancelling.float())
        shift = (s * (model[0].bias - bn.running_mean) + bn.bias).double()
        model[2].bias.copy_((-(model[2].weight.double() @ shift)).float())
    return model


def main(seeds: int = 8) -> None:
    print("| seed | float32 original | correct ONNX (ratio) | one channel 0.1% off (ratio) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(seeds):
            model = ill_conditioned(seed)
            wrong = copy.deepcopy(model)
            with torch.no_grad():
                wrong[1].weight[0] *= 1.001
            errors = []
            for name, candidate in (("right", model), ("wrong", wrong)):
                path = Path(folder) / f"{name}{seed}.onnx"
                bnfold.export(candidate, (torch.randn(1, 64),), path, verify=False)
                errors.append(bnfold.verify(model, path, reference="float64").outputs[0])
            original = errors[0].float64_rel_error_original
            right, wrong_err = (e.float64_rel_error_onnx for e in errors)
            print(
                f"| {seed} | {original:.2e} | {right:.2e} ({right / original:.2f}) | "
                f"{wrong_err:.2e} ({wrong_err / original:.0f}) |"
            )


if __name__ == "__main__":
    main()
