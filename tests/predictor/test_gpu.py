"""GPU tests (``python -m pytest -m gpu``): the CUDA provider and I/O binding on a real GPU.

They need onnxruntime-gpu with its CUDA libraries and a CUDA build of torch (the CUDA tensor
tests): on a Linux x86_64 machine with an NVIDIA driver, from PyPI, whose Linux torch wheel is a
CUDA build (a ``+cpu`` wheel is not)::

    .venv/bin/pip install --force-reinstall torch==2.13.0 'onnxruntime-gpu[cuda,cudnn]'
    .venv/bin/python -c "import torch; print(torch.version.cuda)"   # a CUDA version, not None

Each test skips, naming what is missing, where the CUDA provider does not work or torch has no
CUDA. The CPU fallback branches are tested without a GPU in ``test_session.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_input, randomize_batchnorms
from torch import nn

import bnfold

pytestmark = pytest.mark.gpu
NO_TORCH_CUDA = (
    f"torch {torch.__version__} has no CUDA, so CUDA tensors cannot be made: install a CUDA build of torch "
    "(see this module's docstring)"
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
        )
    )
    return bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path_factory.mktemp("gpu") / "m.onnx").path


def cuda_predictor(path: str, **kwargs) -> bnfold.Predictor:
    try:
        return bnfold.Predictor(path, device="cuda", **kwargs)
    except bnfold.BnfoldError as exc:
        pytest.skip(f"no working CUDA provider (see this module's docstring for the install): {exc}")


def test_cuda_provider_is_really_used(model_path):
    predictor = cuda_predictor(model_path)
    assert predictor.device == "cuda" and predictor.providers[0] == "CUDAExecutionProvider"


def test_cuda_results_equal_cpu_results(model_path):
    x = np.random.default_rng(0).standard_normal((37, 3, 8, 8)).astype(np.float32)
    gpu = cuda_predictor(model_path, batch_size=16).predict(x)
    cpu = bnfold.Predictor(model_path, device="cpu").predict(x)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_torch_cuda_tensors_in_and_out_with_io_binding(model_path):
    predictor = cuda_predictor(model_path)
    if not torch.cuda.is_available():
        pytest.skip(NO_TORCH_CUDA)
    x = torch.randn(5, 3, 8, 8, device="cuda")
    out = predictor.predict(x, as_torch=True)
    assert out.is_cuda and out.shape == (5, 10)
    cpu = bnfold.Predictor(model_path, device="cpu").predict(x.cpu().numpy())
    np.testing.assert_allclose(out.cpu().numpy(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("as_torch", [True, False])
def test_torch_cuda_tensors_are_split_by_batch_size(model_path, as_torch):
    predictor = cuda_predictor(model_path, batch_size=4)
    if not torch.cuda.is_available():
        pytest.skip(NO_TORCH_CUDA)
    x = torch.randn(11, 3, 8, 8, device="cuda")
    out = predictor.predict(x, as_torch=as_torch)
    got = out.cpu().numpy() if as_torch else out
    assert (out.is_cuda if as_torch else isinstance(out, np.ndarray)) and got.shape == (11, 10)
    cpu = bnfold.Predictor(model_path, device="cpu").predict(x.cpu().numpy())
    np.testing.assert_allclose(got, cpu, rtol=1e-4, atol=1e-4)


def test_fp16_model_on_cuda(tmp_path):
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    path = bnfold.export(model, (random_input(1, 3, 8, 8),), tmp_path / "h.onnx", fp16=True).path
    out = cuda_predictor(path).predict(random_input(4, 3, 8, 8).numpy())
    assert out.dtype == np.float16 and np.isfinite(out).all()
