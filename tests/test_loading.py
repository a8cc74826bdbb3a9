"""Loading: formats detected from content, unsafe pickles refused, state_dict + --arch checked."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.loading import EXPORTED_PROGRAM, PICKLED_MODULE, STATE_DICT, TORCHSCRIPT, load_model, parse_shape

ARCH = "sample_models.architectures:digits_cnn"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))


def net() -> nn.Module:
    from sample_models.architectures import digits_cnn

    return digits_cnn().eval()


def test_torchscript_with_recorded_input_shape(tmp_path):
    path = tmp_path / "ts.bin"  # the extension is irrelevant
    torch.jit.save(
        torch.jit.trace(net(), torch.randn(2, 1, 8, 8)),
        str(path),
        _extra_files={"bnfold.json": json.dumps({"input_shape": [1, 1, 8, 8]})},
    )
    loaded = load_model(path)
    assert loaded.format == TORCHSCRIPT and loaded.input_shapes == [(1, 1, 8, 8)]


def test_exported_program_carries_its_input_shape(tmp_path):
    path = tmp_path / "m.pt"
    torch.export.save(torch.export.export(net(), (torch.randn(3, 1, 8, 8),)), str(path))
    loaded = load_model(path)
    assert loaded.format == EXPORTED_PROGRAM and loaded.input_shapes == [(3, 1, 8, 8)]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", None])
def test_state_dict_and_checkpoint_dicts_with_arch(tmp_path, key):
    model = net()
    payload = (
        model.state_dict()
        if key is None
        else {key: model.state_dict(), "epoch": np.int64(3), "acc": np.float64(0.9), "input_shape": [1, 1, 8, 8]}
    )
    torch.save(payload, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=ARCH)
    assert loaded.format == STATE_DICT
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))


def test_dataparallel_prefix_is_stripped(tmp_path):
    torch.save({f"module.{k}": v for k, v in net().state_dict().items()}, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=ARCH).format == STATE_DICT


def test_state_dict_without_arch_says_how_to_proceed(tmp_path):
    torch.save(net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match="--arch"):
        load_model(tmp_path / "m.pt")


def test_arch_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = net().state_dict()
    state.pop("head.0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.3.weight"] = torch.zeros(3, 64)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(bnfold.ModelLoadError) as info:
        load_model(tmp_path / "m.pt", arch=ARCH)
    message = str(info.value)
    assert "missing keys (1): head.0.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "head.3.weight (3, 64) vs (10, 64)" in message


def test_arch_from_a_file_path_with_kwargs(tmp_path):
    torch.save(net().state_dict(), tmp_path / "m.pt")
    loaded = load_model(
        tmp_path / "m.pt", arch="sample_models/architectures.py:digits_cnn", arch_kwargs={"num_classes": 10}
    )
    assert loaded.format == STATE_DICT


@pytest.mark.parametrize("spec", ["nocolon", "sample_models.architectures:nope", "no_such_module_xyz:f"])
def test_bad_arch_is_a_usage_error(tmp_path, spec):
    torch.save(net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match="--arch"):
        load_model(tmp_path / "m.pt", arch=spec)


class Marker:
    """Unpickling this creates a file: proof that code from the file ran."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_module_is_refused_without_trust_and_names_the_globals(tmp_path):
    torch.save(net(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UnsafeModelError) as info:
        load_model(tmp_path / "m.pt")
    assert "sample_models.architectures.DigitsCNN" in str(info.value) and "--trust-pickle" in str(info.value)
    assert load_model(tmp_path / "m.pt", trust_pickle=True).format == PICKLED_MODULE


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    Marker.path = str(marker)
    torch.save({"state_dict": net().state_dict(), "payload": Marker()}, tmp_path / "evil.pt")
    with open(tmp_path / "legacy.pt", "wb") as fh:
        pickle.dump(Marker(), fh, protocol=2)
    for name in ("evil.pt", "legacy.pt"):
        with pytest.raises(bnfold.BnfoldError):
            load_model(tmp_path / name, arch=ARCH)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b'{"a": 1}', "text or JSON"),
        (bytes(range(7, 71)), "not a PyTorch model"),
        (b"PK\x03\x04garbage", "damaged archive"),
    ],
    ids=["empty", "json", "random", "corrupt-zip"],
)
def test_files_that_are_not_models(tmp_path, content, match):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(bnfold.ModelLoadError, match=match):
        load_model(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(bnfold.ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(bnfold.ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_parse_shape():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("", "1x", "x3", "1x0x2", "1xax2", "-1x3"):
        with pytest.raises(bnfold.UsageError, match="--input-shape"):
            parse_shape(bad)


def test_missing_input_shape_is_a_clear_error(tmp_path):
    torch.save(net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match="--input-shape"):
        load_model(tmp_path / "m.pt", arch=ARCH).example_inputs()


def test_state_dict_without_num_batches_tracked_and_with_compile_prefix(tmp_path):
    state = {f"_orig_mod.{k}": v for k, v in net().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", arch=ARCH).format == STATE_DICT
