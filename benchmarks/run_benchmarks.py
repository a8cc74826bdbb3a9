"""Every README performance ratio of `bnfold bench`, for the sample models and ResNet-18/50- and
MobileNetV2-shaped nets (random weights, non-trivial BN statistics), in one run.

    python benchmarks/run_benchmarks.py [--quick]      # from the repository root; JSON to benchmarks/results.json

Prints one markdown table of medians and ratios per model (batch 1 and 8), CPU only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import MODELS

import bnfold
from bnfold.bench import EAGER_FLOOR, EAGER_FOLDED, EAGER_ORIGINAL, ORT_BNFOLD, ORT_BNFOLD_NOOPT, ORT_PLAIN, bench


def cases(quick: bool):
    for meta in json.loads((ROOT / "sample_models" / "models.json").read_text()):
        loaded = bnfold.load_model(ROOT / "sample_models" / meta["name"] / meta["file"], **meta["load"])
        yield meta["name"], loaded.module, loaded.example_inputs()
        if quick:
            return
    for name, build in MODELS.items():
        yield f"{name} (224x224)", build(), (torch.randn(1, 3, 224, 224),)


def main() -> None:
    quick = "--quick" in sys.argv
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in ms; batch 1 / batch 8")
    print(
        "| model | eager original | eager folded | BN-free floor | folded/floor | folded/original | ORT plain (opt) | ORT bnfold (opt) | ORT bnfold (no opt) | bnfold no-opt / plain opt |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, module, example in cases(quick):
        report = bench(module, example, name=name, batch_sizes=(1, 8), repeats=5 if quick else 15)
        results.append(report.to_dict())
        m, r = report.median_ms, report.ratios()

        def pair(values: dict[int, float], fmt: str = "{:.2f}") -> str:
            return " / ".join(fmt.format(values[b]) for b in (1, 8))

        print(
            f"| {name} | {pair(m[EAGER_ORIGINAL])} | {pair(m[EAGER_FOLDED])} | {pair(m[EAGER_FLOOR])} | "
            f"{pair(r['eager folded / BN-free floor'], '{:.3f}')} | {pair(r['eager folded / eager original'], '{:.3f}')} | "
            f"{pair(m[ORT_PLAIN])} | {pair(m[ORT_BNFOLD])} | {pair(m[ORT_BNFOLD_NOOPT])} | "
            f"{pair(r['ORT bnfold opts disabled / ORT plain default'], '{:.3f}')} |",
            flush=True,
        )
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
