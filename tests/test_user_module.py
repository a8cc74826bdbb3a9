"""The one "first line of an exception" helper every error message uses."""

from __future__ import annotations

import pytest

from bnfold.errors import first_line


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ValueError("\n  bad value  \nmore detail\n"), "bad value"),
        (ValueError(""), "ValueError"),
        (
            RuntimeError("The following operation failed in the TorchScript interpreter.\n...\nRuntimeError: boom"),
            "RuntimeError: boom",
        ),
    ],
    ids=["first-non-empty", "empty", "torchscript-last"],
)
def test_first_line(exc, expected):
    assert first_line(exc) == expected


def test_with_type_prefixes_the_class_once():
    assert first_line(KeyError("x"), with_type=True) == "KeyError: 'x'"
    assert first_line(ValueError(""), with_type=True) == "ValueError"
    assert first_line(RuntimeError("RuntimeError: boom"), with_type=True) == "RuntimeError: boom"


def test_several_lines_are_joined():
    assert first_line(ValueError("a\n\nb\nc"), lines=2) == "a | b"
    assert first_line(ValueError("only"), lines=3) == "only"
