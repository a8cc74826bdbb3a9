"""Train the sample models deterministically on the CPU and save them in five formats.

    python -m sample_models.build            # from the repository root, a few minutes on 2 cores

Writes, for each model, ``sample_models/<name>/`` with the model file, ``test.npz`` (held-out
inputs ``x`` and labels ``y``) and ``meta.json`` (format, how to load it, test accuracy), and
``sample_models/models.json`` listing them all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import architectures as arch
from . import datasets

ROOT = Path(__file__).resolve().parent
SEED = 0
# Image preprocessing matching how the datasets normalise pixels in [0, 1] (bnfold.metadata.Preprocess).
SHAPES_PREPROCESS = {"size": [16, 16], "mean": [0.5], "std": [0.5], "channel_order": "RGB"}
DIGITS_PREPROCESS = {"size": [8, 8], "mean": [0.3], "std": [0.4], "channel_order": "L"}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3, batch: int = 64) -> nn.Module:
    """Adam with a cosine schedule, fixed seed and batch order: the same weights on every run."""
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (per pixel for segmentation outputs), eval mode."""
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def _save_common(
    name: str, model: nn.Module, x_test: np.ndarray, y_test: np.ndarray, meta: dict, save: Callable[[Path], None]
) -> dict:
    folder = ROOT / name
    folder.mkdir(exist_ok=True)
    save(folder / meta["file"])
    np.savez_compressed(folder / "test.npz", x=x_test, y=y_test)
    meta = {
        "name": name,
        **meta,
        "input_shape": [1, *x_test.shape[1:]],
        "test_samples": len(x_test),
        "test_accuracy": accuracy(model, x_test, y_test),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: test accuracy {meta['test_accuracy']:.4f} ({meta['format']})", flush=True)
    return meta


def build_digits() -> dict:
    x, y, xt, yt = datasets.digits(SEED)
    model = train(arch.digits_cnn(), x, y, epochs=15)
    shape = [1, *xt.shape[1:]]
    scripted = torch.jit.trace(model, torch.from_numpy(xt[:2]))
    info = {"input_shape": shape, "labels": [str(d) for d in range(10)], "preprocess": DIGITS_PREPROCESS}
    extra = {"bnfold.json": json.dumps(info)}
    return _save_common(
        "digits_cnn",
        model,
        xt,
        yt,
        {"file": "model.pt", "format": "torchscript", "load": {}},
        lambda p: torch.jit.save(scripted, str(p), _extra_files=extra),
    )


def build_resnet() -> dict:
    x, y, _ = datasets.shapes(3000, SEED)
    xt, yt, _ = datasets.shapes(300, SEED + 1)
    model = train(arch.tiny_resnet(), x, y, epochs=8)
    program = torch.export.export(
        model, (torch.from_numpy(xt[:2]),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    info = {"labels": list(datasets.SHAPES), "preprocess": SHAPES_PREPROCESS}
    extra = {"bnfold.json": json.dumps(info)}
    return _save_common(
        "shapes_resnet",
        model,
        xt,
        yt,
        {"file": "model.pt2", "format": "torch.export", "load": {}},
        lambda p: torch.export.save(program, str(p), extra_files=extra),
    )


def build_mobilenet() -> dict:
    x, y, _ = datasets.shapes(3000, SEED + 2)
    xt, yt, _ = datasets.shapes(300, SEED + 3)
    model = train(arch.mobilenet_tiny(num_classes=4), x, y, epochs=8)
    load = {"arch": "sample_models.architectures:mobilenet_tiny", "arch_kwargs": {"num_classes": 4}}
    ckpt = {
        "state_dict": model.state_dict(),
        "input_shape": [1, *xt.shape[1:]],
        "labels": list(datasets.SHAPES),
        "preprocess": SHAPES_PREPROCESS,
    }
    return _save_common(
        "shapes_mobilenet",
        model,
        xt,
        yt,
        {"file": "model.pt", "format": "state_dict", "load": load},
        lambda p: torch.save(ckpt, p),
    )


def build_segnet() -> dict:
    x, _, m = datasets.shapes(2000, SEED + 4)
    xt, _, mt = datasets.shapes(200, SEED + 5)
    model = train(arch.segnet_tiny(), x, m, epochs=6)
    payload = {
        "model": model,
        "input_shape": [1, *xt.shape[1:]],
        "labels": ["background", "shape"],
        "preprocess": SHAPES_PREPROCESS,
    }
    return _save_common(
        "shapes_segnet",
        model,
        xt,
        mt,
        {"file": "model.pt", "format": "pickled nn.Module", "load": {"trust_pickle": True}},
        lambda p: torch.save(payload, p),
    )


def build_signal() -> dict:
    x, y = datasets.signals(3000, SEED + 6)
    xt, yt = datasets.signals(400, SEED + 7)
    model = train(arch.signal_net(), x, y, epochs=10)
    load = {"arch": "sample_models/architectures.py:signal_net"}
    # numpy scalars are common in checkpoints; bnfold loads them without --trust-pickle.
    ckpt = {
        "model_state_dict": model.state_dict(),
        "input_shape": [1, *xt.shape[1:]],
        "epoch": np.int64(10),
        "labels": list(datasets.SIGNALS),
    }
    return _save_common(
        "signal_cnn",
        model,
        xt,
        yt,
        {"file": "model.pt", "format": "state_dict", "load": load},
        lambda p: torch.save(ckpt, p),
    )


def build_preact() -> dict:
    x, y, _ = datasets.shapes(3000, SEED + 8)
    xt, yt, _ = datasets.shapes(200, SEED + 9)
    model = train(arch.preact_resnet(), x, y, epochs=8)
    load = {"arch": "sample_models.architectures:preact_resnet"}
    ckpt = {
        "model_state_dict": model.state_dict(),
        "input_shape": [1, *xt.shape[1:]],
        "labels": list(datasets.SHAPES),
        "preprocess": SHAPES_PREPROCESS,
    }
    return _save_common(
        "shapes_preact",
        model,
        xt,
        yt,
        {"file": "model.pt", "format": "state_dict", "load": load},
        lambda p: torch.save(ckpt, p),
    )


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    builders = (build_digits, build_resnet, build_mobilenet, build_segnet, build_signal, build_preact)
    metas = [build() for build in builders]
    (ROOT / "models.json").write_text(json.dumps(metas, indent=2) + "\n")
    print(f"built {len(metas)} sample models in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
