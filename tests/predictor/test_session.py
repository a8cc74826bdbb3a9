"""Choosing the session: CUDA when it really works, else the CPU said out loud (``device="auto"``)
or an error (``device="cuda"``). The CUDA branches run on any machine: the provider list, the
driver probe and the session's providers are faked, so no test depends on the host's GPU."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from bnfold.cli.commands.predict import predict_command
from bnfold.cli.flags import cli_message
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold
from bnfold.predictor import CPU, CUDA, CUDA_OPTIONS, Predictor, session

REAL_SESSION = ort.InferenceSession


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5)))
    return bnfold.export(model, (random_input(1, 3, 6, 6),), tmp_path_factory.mktemp("s") / "m.onnx").path


class CudaReportingSession:
    """A real CPU session that reports the CUDA provider first, as a working CUDA session does."""

    def __init__(self, real: ort.InferenceSession) -> None:
        self._real = real

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {CUDA: {"device_id": "0"}, CPU: {}}

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest.fixture
def fake_host(monkeypatch):
    """Set what the host offers: ``providers`` (onnxruntime's build), ``driver`` (libcuda) and
    whether a session asked for CUDA ``starts_cuda``. Records the provider lists asked for."""
    requested: list[list] = []

    def configure(*, providers=(CUDA, CPU), driver=True, starts_cuda=False) -> list[list]:
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))
        monkeypatch.setattr(session, "nvidia_driver_present", lambda: driver)
        monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)

        def create(path, sess_options=None, providers=None):
            requested.append(list(providers))
            real = REAL_SESSION(path, sess_options=sess_options, providers=[CPU])
            wants_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA for p in providers)
            return CudaReportingSession(real) if wants_cuda and starts_cuda else real

        monkeypatch.setattr(ort, "InferenceSession", create)
        return requested

    return configure


FALLBACKS = {
    "no-cuda-provider": (dict(providers=(CPU,)), "has no CUDA provider; install onnxruntime-gpu"),
    "no-driver": (dict(driver=False), "no NVIDIA driver (libcuda) found"),
    "provider-fails-to-start": (dict(starts_cuda=False), "could not start its CUDA provider"),
}


@pytest.mark.parametrize("case", list(FALLBACKS), ids=list(FALLBACKS))
def test_auto_falls_back_to_the_cpu_with_a_warning_naming_the_reason(model_path, fake_host, case):
    host, reason = FALLBACKS[case]
    fake_host(**host)
    with pytest.warns(bnfold.CudaUnavailableWarning, match=f"running on CPU: .*{re.escape(reason)}"):
        p = Predictor(model_path, device="auto")
    assert p.device == "cpu" and p.providers == [CPU] and reason in p.fallback_reason
    assert p.predict(np.zeros((2, 3, 6, 6), np.float32)).shape == (2, 5)


@pytest.mark.parametrize("case", list(FALLBACKS), ids=list(FALLBACKS))
def test_cuda_that_does_not_work_is_an_error_naming_the_reason(model_path, fake_host, case):
    host, reason = FALLBACKS[case]
    fake_host(**host)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a fallback
        with pytest.raises(bnfold.BnfoldError, match=f"^`device='cuda'`: .*{re.escape(reason)}") as raised:
            Predictor(model_path, device="cuda")
    assert cli_message(raised.value, predict_command).startswith("--device cuda: ")
    assert "(--device auto falls back to the CPU)" in cli_message(raised.value, predict_command)


def test_cuda_is_not_tried_where_it_cannot_work(model_path, fake_host):
    requested = fake_host(providers=(CPU,))
    with pytest.warns(bnfold.CudaUnavailableWarning):
        Predictor(model_path, device="auto")
    assert requested == [[CPU]]


def test_working_cuda_is_chosen_silently_with_its_options(model_path, fake_host):
    requested = fake_host(starts_cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = Predictor(model_path, device="auto")
        strict = Predictor(model_path, device="cuda")
    assert requested == [[(CUDA, CUDA_OPTIONS), CPU]] * 2
    assert CUDA_OPTIONS == {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    for predictor in (p, strict):
        assert predictor.device == "cuda" and predictor.device_id == 0 and predictor.fallback_reason is None


def test_cpu_and_explicit_providers_never_probe_cuda(model_path, fake_host, monkeypatch):
    requested = fake_host(starts_cuda=True)
    monkeypatch.setattr(session, "cuda_problem", lambda: pytest.fail("CUDA was probed"))
    assert Predictor(model_path, device="cpu").device == "cpu"
    assert Predictor(model_path, providers=[CPU]).device == "cpu"
    assert requested == [[CPU], [CPU]]


def test_missing_and_unloadable_files_are_model_load_errors(tmp_path):
    with pytest.raises(bnfold.ModelLoadError, match="does not exist"):
        Predictor(tmp_path / "nope.onnx", device="cpu")
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(bnfold.ModelLoadError, match="cannot be loaded by ONNX Runtime: "):
        Predictor(tmp_path / "bad.onnx", device="cpu")


@pytest.mark.parametrize("spin_wait, optimize", [(True, True), (False, False)])
def test_session_options_follow_spin_wait_and_optimize(model_path, monkeypatch, spin_wait, optimize):
    created: list[ort.SessionOptions] = []

    def recording(path, sess_options=None, **kwargs):
        created.append(sess_options)
        return REAL_SESSION(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    p = Predictor(model_path, device="cpu", spin_wait=spin_wait, optimize=optimize)
    (options,) = created
    key = "session.intra_op.allow_spinning"
    if spin_wait:  # ORT's default (spinning) is left as it is: the entry is not set
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry(key)
    else:
        assert options.get_session_config_entry(key) == "0"
    disabled = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert (options.graph_optimization_level == disabled) == (not optimize)
    assert p.predict(np.zeros((2, 3, 6, 6), np.float32)).shape == (2, 5)
