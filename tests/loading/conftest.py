import pytest
from hostile import ROOT


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """``arch`` specs and pickled classes import ``sample_models`` from the repository root."""
    monkeypatch.chdir(ROOT)
