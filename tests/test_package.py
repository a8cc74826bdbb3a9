"""The `bnfold` package: running an exported model does not import torch; no module shares a
name with a function of the API; the package pickles by name (Ray ships closures)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bnfold


def test_the_predictor_and_the_errors_come_without_torch():
    code = "import sys, bnfold, bnfold.predictor; print('torch' in sys.modules, 'onnxscript' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_api_functions_stay_functions_once_every_module_is_imported():
    import pkgutil

    for module in pkgutil.walk_packages(bnfold.__path__, "bnfold."):
        if not module.name.startswith(("bnfold.on_ray.", "bnfold.cli")):  # those need Ray or click
            importlib.import_module(module.name)
    for name in ("export", "fold", "recalibrate", "verify", "load_model"):
        assert callable(getattr(bnfold, name)) and getattr(bnfold, name).__name__ == name, name
    modules = {module.name.rpartition(".")[2] for module in pkgutil.iter_modules(bnfold.__path__)}
    assert not modules & set(bnfold.__all__), "a module named like an API name hides it once imported"
    assert bnfold.DEFAULT_RTOL > 0


def test_the_package_pickles_by_name_as_ray_ships_it():
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    assert cloudpickle.loads(cloudpickle.dumps(bnfold)) is bnfold
