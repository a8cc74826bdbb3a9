"""bnfold on Ray: batch inference past one machine with Ray Data (``pip install 'bnfold[ray]'``).

:func:`predict_dataset` turns inputs (a Ray Dataset, or paths Ray reads) into a Dataset of
prediction rows, predicted by a pool of actors that each run a :class:`~bnfold.Predictor`;
:func:`write_predictions` writes them to parquet. :func:`ray_instance` starts or joins Ray.
:func:`model_app` serves a model over HTTP on Ray Serve (:func:`model_server` runs it).

Importing this package does not import Ray; using any of these names without Ray installed is a
:class:`~bnfold.UsageError` that names the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from .cluster import require_ray

_NAMES = {
    "predict_dataset": "dataset",
    "write_predictions": "dataset",
    "PredictionSummary": "dataset",
    "PredictionRows": "rows",
    "ray_instance": "cluster",
    "model_app": "serve",
    "model_server": "serve",
    "ServeOptions": "serve_options",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_ray()
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
