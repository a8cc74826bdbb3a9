"""``dynamic_size``: one export of an encoder-decoder with skip concatenations (U-Net, FPN), a
DeepLabV3 (atrous convolutions, global pooling) and a YOLO-style detector takes the sizes their
strides allow, states them in the report and the metadata, and matches eval-mode PyTorch at three
sizes; verification runs at those sizes, so a model that only matches at the traced size fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close, random_input
from sized_models import DeepLabLike, FPNLike, UNetLike, YoloLike, model
from torch import nn

import bnfold
from bnfold.image_sizes import AxisSizes
from bnfold.metadata import Preprocess
from bnfold.predictor import Predictor

# kind, example HxW, the sizes each axis takes
MODELS = {
    "unet": (UNetLike, (32, 32), AxisSizes(16, 8)),
    "fpn": (FPNLike, (48, 32), AxisSizes(32, 16)),
    "deeplabv3": (DeepLabLike, (32, 40), AxisSizes(5)),
    "yolo": (YoloLike, (64, 64), AxisSizes(64, 32)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[nn.Module, bnfold.ExportResult]]:
    """Each model exported once with a dynamic size (and verified)."""
    folder = tmp_path_factory.mktemp("sizes")
    out = {}
    for name, (kind, (h, w), _) in MODELS.items():
        module = model(kind)
        out[name] = (
            module,
            bnfold.export(module, (random_input(1, 3, h, w),), folder / f"{name}.onnx", dynamic_size=True),
        )
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_one_export_takes_the_sizes_its_strides_allow_and_matches_pytorch_at_three_sizes(exported, name):
    module, result = exported[name]
    _, example, rule = MODELS[name]
    predictor = Predictor(result.path, device="cpu")
    sizes = predictor.image_sizes["x"]
    assert (sizes.height, sizes.width, sizes.example) == (rule, rule, example)
    tried = sizes.verification_sizes()
    assert result.verify_report.passed and result.verify_report.image_sizes == [f"{h}x{w}" for h, w in tried]
    assert len(set(tried)) == 3 and all(h != w for h, w in tried[1:])
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.HasField("dim_value") for d in (dims[2], dims[3]))
    for seed, (h, w) in enumerate(tried):  # the test's own comparison, apart from bnfold's verification
        x = random_input(2, 3, h, w, seed=seed)
        with torch.no_grad():
            expected = module(x)
        assert_close(expected, torch.from_numpy(predictor.predict(x.numpy())))


def test_the_sizes_are_stated_in_the_report_and_the_metadata(exported):
    _, result = exported["unet"]
    assert "dynamic batch, dynamic size," in str(result)
    assert "Image size: dynamic, height a multiple of 8, at least 16; width a multiple of 8, at least 16" in str(result)
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    rule = {"min": 16, "multiple_of": 8, "max": None}
    assert json.loads(meta["bnfold_image_sizes"]) == {"x": {"height": rule, "width": rule, "example": [32, 32]}}
    assert json.loads(meta["bnfold_fold_report"])["dynamic_size"] is True


class OnlyAtTracedSize(nn.Module):
    """The model, off by one away from its traced size of 32x32 (as a cached size would make it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y if tuple(x.shape[-2:]) == (32, 32) else y + 1


def test_verification_at_the_other_sizes_fails_a_model_that_only_matches_at_the_traced_size(exported):
    module, result = exported["unet"]
    assert bnfold.verify(module, result.path).passed
    report = bnfold.verify(OnlyAtTracedSize(module), result.path)
    assert not report.passed and report.image_sizes == ["32x32", "24x32", "40x48"]


def test_preprocessing_keeps_each_images_size_only_with_a_dynamic_size(tmp_path):
    keep = Preprocess(size=None, mean=(0.5,), std=(0.25,))
    with pytest.raises(bnfold.UsageError, match=r"`preprocess.size` dynamic .* needs `dynamic_size=True`"):
        bnfold.ExportOptions(preprocess=keep)
    odd = Preprocess(size=(30, 32), mean=(0.5,), std=(0.25,))
    with pytest.raises(bnfold.UsageError, match=r"`preprocess.size` 30x32: height 30: expected a multiple of 8"):
        bnfold.export(
            model(UNetLike), (random_input(1, 3, 32, 32),), tmp_path / "m.onnx", dynamic_size=True, preprocess=odd
        )
    assert not Path(tmp_path / "m.onnx").exists()


def test_int8_does_not_take_a_dynamic_size_yet(tmp_path):
    np.save(tmp_path / "calibration.npy", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(bnfold.UsageError, match=r"`int8=True` does not take `dynamic_size=True` \(yet\)"):
        bnfold.ExportOptions(int8=True, calibration=tmp_path / "calibration.npy", dynamic_size=True)
