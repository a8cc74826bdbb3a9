"""Formats detected from the content (not the extension), files that are not models, and the
argument checks :func:`load_model` makes before reading anything."""

from __future__ import annotations

import json

import pytest
import torch
from hostile import DIGITS, DIGITS_ARCH, digits_net

import bnfold
from bnfold.loading import EXPORTED_PROGRAM, TORCHSCRIPT, load_model, sniff_format


def test_torchscript_with_recorded_input_shape(tmp_path):
    path = tmp_path / "ts.bin"  # the extension is irrelevant
    torch.jit.save(
        torch.jit.trace(digits_net(), torch.randn(2, 1, 8, 8)),
        str(path),
        _extra_files={"bnfold.json": json.dumps({"input_shape": [1, 1, 8, 8]})},
    )
    loaded = load_model(path)
    assert loaded.format == TORCHSCRIPT and loaded.input_shapes == [(1, 1, 8, 8)]


def test_exported_program_carries_its_input_shape(tmp_path):
    path = tmp_path / "m.pt"
    torch.export.save(torch.export.export(digits_net(), (torch.randn(3, 1, 8, 8),)), str(path))
    loaded = load_model(path)
    assert loaded.format == EXPORTED_PROGRAM and loaded.input_shapes == [(3, 1, 8, 8)]
    assert sniff_format(path) == EXPORTED_PROGRAM


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


def test_torchscript_with_arch_is_refused_before_loading():
    with pytest.raises(bnfold.UsageError, match="drop `arch`"):
        load_model(DIGITS, arch=DIGITS_ARCH)


def test_arch_kwargs_need_arch():
    with pytest.raises(bnfold.UsageError, match=r"`arch_kwargs`.*need `arch`"):
        load_model(DIGITS, arch_kwargs={"num_classes": 10})
    assert load_model(DIGITS, arch_kwargs={}).format == TORCHSCRIPT  # nothing to pass: nothing asked


def test_arch_kwargs_must_be_a_mapping():
    with pytest.raises(bnfold.UsageError, match=r"`arch_kwargs` must be a mapping .*\(got a list\)"):
        load_model(DIGITS, arch=DIGITS_ARCH, arch_kwargs=[10])
