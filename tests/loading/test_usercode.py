"""What ``arch`` imports: the module it names and nothing else, with errors that name ``arch``."""

from __future__ import annotations

import sys

import pytest
import torch
from hostile import assert_one_line_error, digits_net, digits_state_dict, run_cli
from torch import nn

import bnfold
from bnfold.loading import load_model, resolve_factory


@pytest.mark.parametrize("spec", ["nocolon", "sample_models.architectures:nope", "no_such_module_xyz:f"])
def test_bad_arch_is_a_usage_error(tmp_path, spec):
    torch.save(digits_net().state_dict(), tmp_path / "m.pt")
    with pytest.raises(bnfold.UsageError, match="`arch`"):
        load_model(tmp_path / "m.pt", arch=spec)


def test_arch_imports_only_the_named_module(tmp_path, monkeypatch):
    (tmp_path / "good.py").write_text(
        "import pathlib, torch\npathlib.Path('good_ran').touch()\n"
        "def factory():\n    return torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
    )
    (tmp_path / "evil.py").write_text("import pathlib\npathlib.Path('evil_ran').touch()\n")
    torch.save({"state_dict": nn.Sequential(nn.Linear(2, 2)).state_dict(), "arch": "evil:factory"}, tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    loaded = load_model("m.pt", arch="good:factory")
    assert loaded.format == "state_dict"
    assert (tmp_path / "good_ran").exists()  # documented: `arch` runs the module it names
    assert not (tmp_path / "evil_ran").exists()  # and nothing else, whatever the file says
    assert sys.path == path_before  # the current directory was importable only meanwhile
    sys.modules.pop("good", None)


def test_arch_file_path_form_runs_that_file(tmp_path):
    (tmp_path / "net.py").write_text(
        "import pathlib, torch\npathlib.Path(__file__).with_name('ran').touch()\n"
        "def factory():\n    return torch.nn.Linear(2, 2)\n"
    )
    assert callable(resolve_factory(f"{tmp_path / 'net.py'}:factory"))
    assert (tmp_path / "ran").exists()


def test_arch_that_fails_to_import_is_a_usage_error(tmp_path):
    torch.save(digits_state_dict(), tmp_path / "m.pt")
    (tmp_path / "broken.py").write_text("raise ImportError('needs a GPU library')\n")
    with pytest.raises(bnfold.UsageError, match=r"^`arch` .*broken\.py:f': importing .* needs a GPU library"):
        load_model(tmp_path / "m.pt", arch=f"{tmp_path / 'broken.py'}:f")
    result = run_cli("inspect", tmp_path / "m.pt", "--arch", f"{tmp_path / 'broken.py'}:f", "--input-shape", "1x1x8x8")
    assert_one_line_error(result, 2, "--arch", "needs a GPU library")
