"""Run an ONNX model in ONNX Runtime: CUDA when it really works, CPU otherwise (said out loud),
with input checks and batching. Verification runs ONNX models through this class too."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import BnfoldError, ModelLoadError, UsageError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class CudaUnavailableWarning(UserWarning):
    """``device="auto"`` fell back to the CPU; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` or a string for a free dimension) and numpy dtype of a model input/output."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def batch_is_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


def _spec(arg: Any) -> TensorSpec:
    if arg.type not in _ORT_FLOAT_TYPES:
        dtype = np.dtype(np.int64) if "int64" in arg.type else np.dtype(object)
    else:
        dtype = np.dtype(_ORT_FLOAT_TYPES[arg.type])
    return TensorSpec(arg.name, tuple(d if isinstance(d, int) else (d or None) for d in arg.shape), dtype)


def _session_options(optimize: bool, threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: bnfold reports provider problems itself
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def _cuda_problem() -> str | None:
    """Why CUDA cannot be asked for in this onnxruntime build, or None if it can."""
    if CUDA not in ort.get_available_providers():
        return (
            f"this onnxruntime build ({ort.__version__}) has no CUDA provider; "
            "install onnxruntime-gpu (and remove onnxruntime)"
        )
    return None


def _preload_cuda_libraries() -> None:
    """Make the CUDA/cuDNN libraries of pip-installed torch/nvidia packages findable."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # nothing to preload: the session creation reports the real problem
            pass


class Predictor:
    """ONNX Runtime inference on an exported model.

    ``device``: ``"cuda"`` (CUDA or a :class:`BnfoldError` saying why not), ``"cpu"``, or
    ``"auto"`` (CUDA when it really works, else CPU with a :class:`CudaUnavailableWarning`).
    ``batch_size`` splits large inputs into chunks; ``threads`` sets ORT's intra-op threads;
    ``providers`` overrides the provider list entirely; ``optimize=False`` disables ORT's graph
    optimizations (verification uses that so ORT's own fusions cannot hide a wrong fold).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int | None = None,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
        optimize: bool = True,
    ) -> None:
        if device not in DEVICES:
            raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be at least 1")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"ONNX model {self.path} does not exist")
        options = _session_options(optimize, threads)
        self.fallback_reason: str | None = None
        if providers is not None:
            self._session = self._create(options, list(providers))
        elif device == "cpu":
            self._session = self._create(options, [CPU])
        else:
            self._session = self._create_cuda(options, strict=device == "cuda")
        self.providers: list[str] = self._session.get_providers()
        self.device = "cuda" if self.providers and self.providers[0] == CUDA else "cpu"
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        static = [s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int)]
        self.static_batch: int | None = static[0] if static else None
        self.batch_size = batch_size
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    def _create(self, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{self.path} cannot be loaded by ONNX Runtime: {msg}") from exc

    def _create_cuda(self, options: ort.SessionOptions, strict: bool) -> ort.InferenceSession:
        problem = _cuda_problem()
        if problem is None:
            _preload_cuda_libraries()
            session = self._create(options, [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU])
            if session.get_providers()[0] == CUDA:
                return session
            problem = (
                "onnxruntime could not start its CUDA provider (no GPU visible, or the CUDA 12 / "
                "cuDNN 9 libraries were not found; `pip install onnxruntime-gpu[cuda,cudnn]` "
                "brings them)"
            )
        if strict:
            raise BnfoldError(f"--device cuda: {problem}")
        self.fallback_reason = problem
        warnings.warn(f"running on CPU: {problem}", CudaUnavailableWarning, stacklevel=3)
        return self._create(options, [CPU])

    # ----------------------------------------------------------------------------- inputs
    def check_input(self, spec: TensorSpec, array: Any) -> np.ndarray:
        """``array`` as the dtype input ``spec`` takes; a :class:`UsageError` if it cannot be."""
        arr = np.asarray(array)
        if arr.dtype.kind != "f":
            raise UsageError(f"input '{spec.name}': expected a float array ({spec.dtype}), got dtype {arr.dtype}")
        if arr.ndim != len(spec.shape) or any(
            isinstance(want, int) and want != got for want, got in zip(spec.shape[1:], arr.shape[1:])
        ):
            want = "x".join("N" if i == 0 else (str(d) if isinstance(d, int) else "?") for i, d in enumerate(spec.shape))
            raise UsageError(f"input '{spec.name}': expected shape {want}, got {'x'.join(map(str, arr.shape))}")
        return np.ascontiguousarray(arr, dtype=spec.dtype)

    def _feeds(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(x, Mapping):
            names = [s.name for s in self.inputs]
            missing, extra = [n for n in names if n not in x], [n for n in x if n not in names]
            if missing or extra:
                raise UsageError(f"inputs: model expects {names}; missing {missing}, unexpected {extra}")
            feeds = {s.name: self.check_input(s, x[s.name]) for s in self.inputs}
        elif len(self.inputs) == 1:
            feeds = {self.inputs[0].name: self.check_input(self.inputs[0], x)}
        else:
            raise UsageError(f"this model has {len(self.inputs)} inputs {[s.name for s in self.inputs]}: pass a dict")
        sizes = {a.shape[0] for a in feeds.values()}
        if len(sizes) != 1:
            raise UsageError(f"inputs have different batch sizes: {sorted(sizes)}")
        return feeds

    def _chunk(self) -> int | None:
        return self.static_batch or self.batch_size

    def _run_chunk(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = next(iter(feeds.values())).shape[0]
        pad = (self.static_batch - n) if self.static_batch and n < self.static_batch else 0
        if pad:  # a static batch axis: pad with copies of the last row, drop their outputs
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feeds.items()}
        outs = self._session.run(None, feeds)
        return [o[:n] for o in outs] if pad else outs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds, split into chunks of the batch size; outputs in model order."""
        n = next(iter(feeds.values())).shape[0]
        chunk = self._chunk()
        if not chunk or n <= chunk and not self.static_batch:
            return self._session.run(None, feeds)
        parts = [self._run_chunk({k: v[i : i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.outputs))]

    def predict(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
        """Numpy in, numpy out for one input and one output; a dict of name -> array otherwise.

        Float inputs are cast to the model's dtype; integer or wrongly shaped inputs raise a
        :class:`UsageError` naming the input. Safe to call from several threads.
        """
        outs = self.run(self._feeds(x))
        if len(self.inputs) == 1 and len(self.outputs) == 1 and not isinstance(x, Mapping):
            return outs[0]
        return {s.name: o for s, o in zip(self.outputs, outs)}

    def predict_batches(self, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]]) -> Iterator[Any]:
        """Stream :meth:`predict` over an iterable of inputs."""
        for batch in batches:
            yield self.predict(batch)
