"""Every shipped sample model: exported, verified on its held-out test set, and its top-1
accuracy identical before and after folding (and equal to the accuracy recorded at build)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bnfold
from bnfold.user_module import run_eval

ROOT = Path(__file__).resolve().parent.parent
MODELS = json.loads((ROOT / "sample_models" / "models.json").read_text())
# Batch-norms no rule can fold: in the pre-activation ResNet, three normalise the output of a
# residual add and one the stem output the identity shortcut also reads, and all four feed a ReLU.
UNFOLDABLE = {"shapes_preact": 4}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # --arch and pickled classes import sample_models from here


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


@pytest.mark.parametrize("meta", MODELS, ids=[m["name"] for m in MODELS])
def test_sample_model(meta, tmp_path):
    folder = ROOT / "sample_models" / meta["name"]
    loaded = bnfold.load_model(folder / meta["file"], **meta["load"])
    assert loaded.format == meta["format"]
    test = np.load(folder / "test.npz")
    result = bnfold.export(loaded.module, loaded.example_inputs(), tmp_path / "model.onnx", inputs=folder / "test.npz")

    report = result.fold_report
    kept = [e for e in report.entries if e.status == "kept"]
    assert len(kept) == UNFOLDABLE.get(meta["name"], 0), str(report)  # nothing foldable left
    assert all("feeds 'relu'" in e.reason for e in kept)
    assert result.verify_report.passed and result.verify_report.samples == meta["test_samples"]
    assert result.onnx_batchnorm_count == len(kept)

    before = top1(run_eval(loaded.module, [torch.from_numpy(test["x"])])[0].numpy(), test["y"])
    after = top1(bnfold.Predictor(result.path, device="cpu").predict(test["x"]), test["y"])
    assert before == after == pytest.approx(meta["test_accuracy"], abs=0)


def test_models_json_lists_every_sample_folder():
    folders = {p.name for p in (ROOT / "sample_models").iterdir() if (p / "meta.json").exists()}
    assert folders == {m["name"] for m in MODELS} and len(folders) == 6
    assert all(os.path.getsize(ROOT / "sample_models" / m["name"] / m["file"]) < 2_000_000 for m in MODELS)
