"""One local Ray instance for the whole test session (2 CPUs, no dashboard, no token file, its
session files in a temporary folder), and the models and inputs the Ray tests share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import bnfold

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "sample_models" / "shapes_resnet"


@pytest.fixture(scope="session")
def ray_temp_dir() -> Iterator[str]:
    """Ray's session files: a short temporary folder (Ray's socket paths must stay under the
    107-character limit, which pytest's deep tmp paths can exceed)."""
    folder = tempfile.mkdtemp(prefix="bnfold-ray-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_temp_dir) -> Iterator[object]:
    """Ray, started once for the session and shut down at its end."""
    from bnfold.on_ray import ray_instance

    with ray_instance(num_cpus=2, temp_dir=ray_temp_dir, token_auth=False) as ray:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        yield ray


@pytest.fixture(scope="session")
def shapes_onnx(tmp_path_factory) -> Path:
    """The shapes classifier (16x16 RGB, labels and preprocessing stored)."""
    loaded = bnfold.load_model(SHAPES / "model.pt2")
    path = tmp_path_factory.mktemp("scale") / "shapes.onnx"
    bnfold.export(
        loaded.module, loaded.example_inputs(), path, verify=False, labels=loaded.labels, preprocess=loaded.preprocess
    )
    return path


@pytest.fixture(scope="session")
def shapes_x() -> np.ndarray:
    return np.load(SHAPES / "test.npz")["x"][:24]
