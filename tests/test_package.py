"""The `bnfold` package: running an exported model does not import torch; the API's functions
named like their modules stay functions; the package pickles by name (Ray ships closures)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import bnfold


def test_the_predictor_and_the_errors_come_without_torch():
    code = "import sys, bnfold, bnfold.predictor; print('torch' in sys.modules, 'onnxscript' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_functions_named_like_their_modules_stay_functions_once_those_are_imported():
    import bnfold.export
    import bnfold.fold.rules
    import bnfold.recalibrate
    import bnfold.verify

    for name in ("export", "fold", "recalibrate", "verify"):
        assert callable(getattr(bnfold, name)) and getattr(bnfold, name).__name__ == name
    assert bnfold.DEFAULT_RTOL > 0 and callable(bnfold.load_model)


def test_the_package_pickles_by_name():
    assert pickle.loads(pickle.dumps(bnfold)) is bnfold
