"""The error family's messages: parameters are parts of the message, spelled by each front end."""

from __future__ import annotations

import pickle

from bnfold.errors import BnfoldError, Param, UsageError, VerificationError, label_parts


def test_python_spelling_of_parameters_and_settings():
    assert str(Param("rtol")) == "`rtol`"
    assert str(Param("verify", False)) == "`verify=False`"
    assert str(Param("device", "cuda")) == "`device='cuda'`"
    assert not Param("rtol").has_value and Param("verify", False).has_value and Param("x", None).has_value


def test_message_parts_render_with_any_spelling():
    error = UsageError(Param("rtol"), "/", Param("atol"), " must be non-negative")
    assert str(error) == "`rtol`/`atol` must be non-negative"
    assert error.params() == (Param("rtol"), Param("atol"))
    spelled = error.render(lambda p: f"--{p.name}" if p.name == "rtol" else None)
    assert spelled == "--rtol/`atol` must be non-negative"  # None: Python's spelling


def test_reworded_keeps_class_parameters_and_report():
    report = object()
    error = VerificationError("checked /tmp/x.tmp with ", Param("rtol"), report=report)
    again = error.reworded(lambda text: text.replace("/tmp/x.tmp", "out.onnx"), " (hint ", Param("verify", False), ")")
    assert type(again) is VerificationError and again.report is report
    assert str(again) == "checked out.onnx with `rtol` (hint `verify=False`)"
    assert again.params() == (Param("rtol"), Param("verify", False))
    assert str(error) == "checked /tmp/x.tmp with `rtol`"  # the original is unchanged


def test_errors_pickle_with_their_parts():
    """Ray sends errors between processes by pickling them."""
    error = pickle.loads(pickle.dumps(UsageError("bad ", Param("port"), " value")))
    assert type(error) is UsageError and error.params() == (Param("port"),) and str(error) == "bad `port` value"
    assert isinstance(error, BnfoldError) and error.exit_code == UsageError.exit_code


def test_labels_are_parts():
    assert label_parts("INPUT") == ("INPUT",)
    assert label_parts(Param("inputs")) == (Param("inputs"),)
    assert label_parts((Param("inputs"), " d.npz")) == (Param("inputs"), " d.npz")
