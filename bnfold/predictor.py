"""Run an ONNX model in ONNX Runtime: CUDA when it really works, CPU otherwise (said out loud),
with input checks and batching. Verification runs ONNX models through this class too."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import BnfoldError, ModelLoadError, UsageError
from .images import load_images
from .metadata import from_metadata
from .modes import first_line

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# CUDA provider options for dynamic batch sizes. cuDNN's default EXHAUSTIVE algorithm search
# benchmarks every convolution algorithm for each new input shape: with a dynamic batch axis every
# new batch size pays seconds of search before its first result. HEURISTIC picks an algorithm from
# cuDNN's heuristics without benchmarking, which is within a few percent of the best for common
# convolutions. kSameAsRequested stops the memory arena from doubling its allocation each time a
# larger batch arrives.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}


class CudaUnavailableWarning(UserWarning):
    """``device="auto"`` fell back to the CPU; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` or a string for a free dimension) and numpy dtype of a model input/output."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def fixed_dims(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every fixed dimension after the batch axis."""
        return tuple((i, d) for i, d in enumerate(self.shape) if i > 0 and isinstance(d, int))

    @property
    def batch_is_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


def _spec(arg: Any) -> TensorSpec:
    if arg.type not in _ORT_FLOAT_TYPES:
        dtype = np.dtype(np.int64) if "int64" in arg.type else np.dtype(object)
    else:
        dtype = np.dtype(_ORT_FLOAT_TYPES[arg.type])
    return TensorSpec(arg.name, tuple(d if isinstance(d, int) else (d or None) for d in arg.shape), dtype)


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def _output_shape(spec: TensorSpec, batch: int) -> tuple[int, ...] | None:
    """The output's shape for a batch of ``batch`` when only its batch axis is free."""
    if not spec.shape or any(not isinstance(d, int) for d in spec.shape[1:]):
        return None
    return (batch if not isinstance(spec.shape[0], int) else spec.shape[0], *spec.shape[1:])


def _with_last_row_repeated(x: Any, times: int) -> Any:
    """``x`` (a numpy array or a torch tensor) with its last row repeated ``times`` more times."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], times, axis=0)])
    import torch

    return torch.cat([x, x[-1:].expand(times, *x.shape[1:])])


def session_options(optimize: bool = True, threads: int | None = None, spin_wait: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options: errors-only logging, graph optimizations on or off, the
    intra-op thread count, and whether idle threads spin-wait between runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: bnfold reports provider problems itself
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def _nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver library (hence possibly a GPU) is there to be used."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _cuda_problem() -> str | None:
    """Why CUDA cannot be asked for at all, or None if it is worth trying."""
    if CUDA not in ort.get_available_providers():
        return (
            f"this onnxruntime build ({ort.__version__}) has no CUDA provider; "
            "install onnxruntime-gpu (and remove onnxruntime)"
        )
    if not _nvidia_driver_present():
        return "no NVIDIA driver (libcuda) found: this machine has no usable GPU"
    return None


@contextlib.contextmanager
def _quiet_cuda_attempt() -> Iterator[None]:
    """Hide onnxruntime's own messages while trying CUDA: bnfold reports the outcome itself."""
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)


def _preload_cuda_libraries() -> None:
    """Make the CUDA/cuDNN libraries of pip-installed torch/nvidia packages findable."""
    if hasattr(ort, "preload_dlls"):
        # Nothing to preload is fine: the session creation reports the real problem.
        with contextlib.suppress(Exception):
            ort.preload_dlls()


class Predictor:
    """ONNX Runtime inference on an exported model.

    ``device``: ``"cuda"`` (CUDA or a :class:`BnfoldError` saying why not), ``"cpu"``, or
    ``"auto"`` (CUDA when it really works, else CPU with a :class:`CudaUnavailableWarning`).
    ``batch_size`` splits large inputs into chunks; ``threads`` sets ORT's intra-op threads;
    ``providers`` overrides the provider list entirely; ``optimize=False`` disables ORT's graph
    optimizations (verification uses that so ORT's own fusions cannot hide a wrong fold).
    ``spin_wait=False`` stops ORT's idle threads from spin-waiting for the next run: use it when
    other work (PyTorch, another session) runs on the same cores between predictions, which
    spinning threads would slow down (verification alternates ORT and PyTorch this way).
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
        spin_wait: bool = True,
    ) -> None:
        if device not in DEVICES:
            raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be at least 1")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"ONNX model {self.path} does not exist")
        options = session_options(optimize, threads, spin_wait)
        self.fallback_reason: str | None = None
        if providers is not None:
            self._session = self._create(options, list(providers))
        elif device == "cpu":
            self._session = self._create(options, [CPU])
        else:
            self._session = self._create_cuda(options, strict=device == "cuda")
        self.providers: list[str] = self._session.get_providers()
        self.device = "cuda" if self.providers and self.providers[0] == CUDA else "cpu"
        cuda_options = self._session.get_provider_options().get(CUDA, {})
        self.device_id = int(cuda_options.get("device_id", 0))
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._fixed = {s.name: s.fixed_dims for s in self.inputs}
        first = self.inputs[0] if len(self.inputs) == 1 and len(self.outputs) == 1 else None
        # One input whose non-batch dims are all fixed: predict() compares shapes as one tuple.
        self._fast = first if first and len(first.fixed_dims) == len(first.shape) - 1 else None
        self._fast_tail = tuple(d for _, d in first.fixed_dims) if self._fast else ()
        static = [s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int)]
        self.static_batch: int | None = static[0] if static else None
        self.batch_size = batch_size
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        try:
            self.labels, self.preprocess = from_metadata(self.metadata)
        except (ValueError, BnfoldError) as exc:
            raise ModelLoadError(f"{self.path}: its labels/preprocessing metadata is malformed ({exc})") from exc

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying ONNX Runtime session (for advanced use and benchmarks)."""
        return self._session

    def _create(self, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{self.path} cannot be loaded by ONNX Runtime: {msg}") from exc

    def _create_cuda(self, options: ort.SessionOptions, strict: bool) -> ort.InferenceSession:
        problem = _cuda_problem()
        if problem is None:
            with _quiet_cuda_attempt():
                _preload_cuda_libraries()
                session = self._create(options, [(CUDA, CUDA_OPTIONS), CPU])
            if session.get_providers()[0] == CUDA:
                return session
            problem = (
                "onnxruntime could not start its CUDA provider: the CUDA or cuDNN libraries this "
                f"onnxruntime-gpu {ort.__version__} build needs were not found (`pip install "
                "'onnxruntime-gpu[cuda,cudnn]'` brings them), or no GPU is visible"
            )
        if strict:
            raise BnfoldError(f"--device cuda: {problem}")
        self.fallback_reason = problem
        warnings.warn(f"running on CPU: {problem}", CudaUnavailableWarning, stacklevel=3)
        return self._create(options, [CPU])

    # ----------------------------------------------------------------------------- inputs
    def _validate(self, spec: TensorSpec, shape: tuple[int, ...], dtype: object, is_float: bool) -> None:
        # Hot path: every predict call comes here, so nothing is formatted unless it fails.
        if not is_float:
            raise UsageError(f"input '{spec.name}': expected a float array ({spec.dtype}), got dtype {dtype}")
        if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in self._fixed[spec.name]):
            want = "x".join(
                "N" if i == 0 else (str(d) if isinstance(d, int) else "?") for i, d in enumerate(spec.shape)
            )
            raise UsageError(f"input '{spec.name}': expected shape {want}, got {'x'.join(map(str, shape))}")

    def check_input(self, spec: TensorSpec, array: Any) -> np.ndarray:
        """``array`` as the dtype input ``spec`` takes; a :class:`UsageError` if it cannot be."""
        arr = array if type(array) is np.ndarray else np.asarray(array)
        self._validate(spec, arr.shape, arr.dtype, arr.dtype.kind == "f")
        if arr.dtype != spec.dtype or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=spec.dtype)
        return arr

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

    def _chunked(
        self, feeds: dict[str, Any], run: Callable[[dict[str, Any]], list[Any]], join: Callable[[list[Any]], Any]
    ) -> list[Any]:
        """``run`` on ``feeds`` (numpy arrays or torch tensors) in chunks of the batch size; a
        static batch axis takes every chunk at exactly its size, the last one padded with copies
        of its last row whose outputs are dropped. Each output's chunks are joined with ``join``."""
        chunk = self.static_batch or self.batch_size
        n = next(iter(feeds.values())).shape[0]
        if chunk is None or (n <= chunk and not self.static_batch):
            return run(feeds)
        if n == 0:
            raise UsageError(f"empty input (0 rows): this model takes batches of {self.static_batch}")
        parts = []
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            part = {k: v[start : start + rows] for k, v in feeds.items()}
            pad = self.static_batch - rows if self.static_batch else 0
            if pad:
                part = {k: _with_last_row_repeated(v, pad) for k, v in part.items()}
            outs = run(part)
            parts.append([o[:rows] for o in outs] if pad else outs)
        if len(parts) == 1:
            return parts[0]
        return [join([p[j] for p in parts]) for j in range(len(self.outputs))]

    def _session_run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own errors: the input does not fit the model
            shapes = ", ".join(f"{k}: {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
            raise UsageError(
                f"{self.path}: ONNX Runtime cannot run inputs of shape {shapes}: {first_line(exc)}"
            ) from exc

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds, split into chunks of the batch size; outputs in model order."""
        return self._chunked(feeds, self._session_run, np.concatenate)

    def predict(self, x: Any, *, as_torch: bool = False) -> Any:
        """Numpy in, numpy out for one input and one output; a dict of name -> array otherwise.

        Float inputs are cast to the model's dtype; integer or wrongly shaped inputs raise a
        :class:`UsageError` naming the input. Safe to call from several threads.

        On CUDA, torch tensors (also as dict values) are bound to the session with I/O binding:
        CUDA tensors are read in place, without a host round trip. ``as_torch=True`` returns
        torch tensors (CUDA tensors on the CUDA provider, written in place by ONNX Runtime).
        """
        fast = self._fast
        if (  # the common case: no conversion, no chunking, one call into ONNX Runtime
            fast is not None
            and type(x) is np.ndarray
            and not as_torch
            and x.dtype == fast.dtype
            and x.shape[1:] == self._fast_tail
            and x.flags.c_contiguous
            and self.batch_size is None
            and self.static_batch is None
        ):
            return self._session.run(None, {fast.name: x})[0]
        single = len(self.inputs) == 1 and len(self.outputs) == 1 and not isinstance(x, Mapping)
        named = x if isinstance(x, Mapping) else {self.inputs[0].name: x} if len(self.inputs) == 1 else None
        if named is not None and any(_is_torch(v) for v in named.values()):
            outs = self._run_torch(named, as_torch)
        else:
            outs = self.run(self._feeds(x))
            if as_torch:
                import torch

                outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if single else {s.name: o for s, o in zip(self.outputs, outs)}

    def _run_torch(self, named: Mapping[str, Any], as_torch: bool) -> list[Any]:
        """Torch tensors in: I/O binding on CUDA; on the CPU, zero-copy numpy views."""
        import torch

        specs = {s.name: s for s in self.inputs}
        missing = [n for n in specs if n not in named]
        if missing or len(named) != len(specs):
            raise UsageError(f"inputs: model expects {list(specs)}; got {list(named)}")
        for name, value in named.items():
            if _is_torch(value):
                self._validate(specs[name], tuple(value.shape), str(value.dtype), value.is_floating_point())
        if self.device != "cuda":
            arrays = {k: (v.detach().cpu().numpy() if _is_torch(v) else v) for k, v in named.items()}
            outs = self.run(self._feeds(arrays))
            return [torch.from_numpy(o) for o in outs] if as_torch else outs
        device = torch.device("cuda", self.device_id)
        tensors = {
            name: value.detach().to(device=device, dtype=getattr(torch, specs[name].dtype.name)).contiguous()
            if _is_torch(value)
            else torch.from_numpy(self.check_input(specs[name], value)).to(device)
            for name, value in named.items()
        }
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise UsageError(f"inputs have different batch sizes: {sorted(sizes)}")
        return self._chunked(
            tensors, lambda part: self._run_bound(part, as_torch), torch.cat if as_torch else np.concatenate
        )

    def _run_bound(self, tensors: dict[str, Any], as_torch: bool) -> list[Any]:
        """One ONNX Runtime run on CUDA tensors through I/O binding: inputs read in place;
        outputs written in place into new CUDA tensors (``as_torch``) or copied to numpy."""
        import torch

        specs = {s.name: s for s in self.inputs}
        device = torch.device("cuda", self.device_id)
        n = next(iter(tensors.values())).shape[0]
        binding = self._session.io_binding()  # one binding per call: thread-safe
        for name, t in tensors.items():
            binding.bind_input(name, "cuda", self.device_id, specs[name].dtype, tuple(t.shape), t.data_ptr())
        outputs: list[Any] = []
        for spec in self.outputs:
            shape = _output_shape(spec, n)
            if as_torch and shape is not None:
                out = torch.empty(shape, dtype=getattr(torch, spec.dtype.name), device=device)
                binding.bind_output(spec.name, "cuda", self.device_id, spec.dtype, shape, out.data_ptr())
                outputs.append(out)
            else:
                binding.bind_output(spec.name, "cuda", self.device_id)
                outputs.append(None)
        torch.cuda.current_stream(device).synchronize()  # inputs written on torch's stream are ready
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        results = []
        for out, value in zip(outputs, values):
            if out is None:
                out = value.numpy()
                out = torch.from_numpy(out).to(device) if as_torch else out
            results.append(out)
        return results

    def predict_images(self, paths: Sequence[str | os.PathLike[str]]) -> Any:
        """Read, resize and normalise image files as the model's preprocessing metadata says
        (``bnfold export --preprocess-*``), then :meth:`predict`. Needs ``bnfold[images]``."""
        if self.preprocess is None:
            raise UsageError(
                f"{self.path} has no preprocessing metadata: export it with --preprocess-size/"
                "--preprocess-mean/--preprocess-std, or pass arrays instead of images"
            )
        return self.predict(load_images(list(paths), self.preprocess))

    def predict_batches(self, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]]) -> Iterator[Any]:
        """Stream :meth:`predict` over an iterable of inputs."""
        for batch in batches:
            yield self.predict(batch)
