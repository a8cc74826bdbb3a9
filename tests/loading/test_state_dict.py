"""A state_dict (alone or in a checkpoint dict) applied to the module the ``arch`` factory builds
with ``arch_kwargs``: wrapper prefixes stripped, every mismatch listed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hostile import DIGITS_ARCH, digits_net
from torch import nn

import bnfold
from bnfold.loading import STATE_DICT, load_model

# A factory whose layer widths come from its keyword arguments.
WIDTH_ARCH = """
from torch import nn


def net(width=4, num_classes=3):
    return nn.Sequential(
        nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )
"""


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", None])
def test_state_dict_and_checkpoint_dicts_with_arch(tmp_path, key):
    model = digits_net()
    payload = (
        model.state_dict()
        if key is None
        else {key: model.state_dict(), "epoch": np.int64(3), "acc": np.float64(0.9), "input_shape": [1, 1, 8, 8]}
    )
    torch.save(payload, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=DIGITS_ARCH)
    assert loaded.format == STATE_DICT
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))


def test_dataparallel_prefix_is_stripped(tmp_path):
    torch.save({f"module.{k}": v for k, v in digits_net().state_dict().items()}, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == STATE_DICT


def test_state_dict_without_num_batches_tracked_and_with_compile_prefix(tmp_path):
    state = {f"_orig_mod.{k}": v for k, v in digits_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=DIGITS_ARCH).format == STATE_DICT


def test_state_dict_without_arch_says_how_to_proceed(tmp_path):
    torch.save(digits_net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match="pass `arch`"):
        load_model(tmp_path / "m.pt")


def test_arch_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = digits_net().state_dict()
    state.pop("head.0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.3.weight"] = torch.zeros(3, 64)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(bnfold.ModelLoadError) as info:
        load_model(tmp_path / "m.pt", arch=DIGITS_ARCH)
    message = str(info.value)
    assert "missing keys (1): head.0.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.3.weight (3, 64) vs (10, 64)" in message


def test_arch_from_a_file_path_with_kwargs(tmp_path):
    torch.save(digits_net().state_dict(), tmp_path / "m.pt")
    loaded = load_model(
        tmp_path / "m.pt", arch="sample_models/architectures.py:digits_cnn", arch_kwargs={"num_classes": 10}
    )
    assert loaded.format == STATE_DICT


def test_arch_kwargs_reach_the_factory(tmp_path):
    """Weights saved at width 8 with 5 classes fit only the module built with those arguments:
    the defaults (width 4, 3 classes) and each argument alone are refused, naming the mismatch."""
    (tmp_path / "arch.py").write_text(WIDTH_ARCH)
    arch = f"{tmp_path / 'arch.py'}:net"
    saved = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    torch.save(saved.state_dict(), tmp_path / "m.pt")
    for kwargs, mismatches in [
        (None, "(8): 0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)"),  # every layer: width and classes
        ({"width": 8}, "(2): 4.weight (5, 8) vs (3, 8), 4.bias (5,) vs (3,)"),  # the classifier only
        ({"num_classes": 5}, "(7): 0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)"),  # all but the classifier's bias
    ]:
        with pytest.raises(bnfold.ModelLoadError) as info:
            load_model(tmp_path / "m.pt", arch=arch, arch_kwargs=kwargs)
        assert f"shape mismatches (file vs arch) {mismatches}" in str(info.value)
    loaded = load_model(tmp_path / "m.pt", arch=arch, arch_kwargs={"width": 8, "num_classes": 5})
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), saved(x))


def test_factory_that_rejects_its_kwargs_is_a_usage_error(tmp_path):
    (tmp_path / "arch.py").write_text(WIDTH_ARCH)
    torch.save(digits_net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match=r"calling it with `arch_kwargs` \{'depth': 3\} failed: TypeError"):
        load_model(tmp_path / "m.pt", arch=f"{tmp_path / 'arch.py'}:net", arch_kwargs={"depth": 3})
