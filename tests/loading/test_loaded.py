"""What a loaded model says of its inputs: shapes parsed from text, and the error when neither
the file nor the caller gives one."""

from __future__ import annotations

import pytest
import torch
from hostile import DIGITS_ARCH, digits_net

import bnfold
from bnfold.loading import load_model, parse_shape


def test_parse_shape():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    assert parse_shape(" 1, 32 ", parameter="batch_sizes") == (1, 32)
    for bad in ("", "1x", "x3", "1x0x2", "1xax2", "-1x3"):
        with pytest.raises(bnfold.UsageError, match="`input_shapes`"):
            parse_shape(bad)


def test_parse_shape_names_the_parameter_it_parses_for():
    with pytest.raises(bnfold.UsageError, match=r"^`preprocess\.size` 'abc' is not valid: .* e\.g\. 224x224$"):
        parse_shape("abc", parameter="preprocess.size", example="224x224")


def test_missing_input_shape_is_a_clear_error(tmp_path):
    torch.save(digits_net().state_dict(), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=DIGITS_ARCH)
    with pytest.raises(bnfold.UsageError, match="`input_shapes`"):
        loaded.example_inputs()
    assert [tuple(t.shape) for t in loaded.example_inputs([(2, 1, 8, 8)])] == [(2, 1, 8, 8)]
