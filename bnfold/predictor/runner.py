"""The :class:`Predictor`: runs an ONNX Runtime session on checked inputs, in batches, numpy or
torch tensors in and out (I/O binding on CUDA)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..batching import Batch, plan_batches, run_in_batches
from ..errors import BnfoldError, ModelLoadError, Param, UsageError, first_line
from ..image_sizes import ImageSizes
from ..images import group_by_size, load_images
from ..metadata import Preprocess, from_metadata, image_sizes_from_metadata, int8_from_metadata
from .binding import is_torch, run_bound
from .session import CudaUnavailableWarning, open_session, placement, session_options
from .specs import TensorSpec, tensor_spec


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
        if batch_size is not None and batch_size < 1:
            raise UsageError(Param("batch_size"), f" must be at least 1 (got {batch_size})")
        self.path = Path(path)
        options = session_options(optimize, threads, spin_wait)
        self._session, self.fallback_reason = open_session(self.path, options, device=device, providers=providers)
        if self.fallback_reason is not None:
            warnings.warn(f"running on CPU: {self.fallback_reason}", CudaUnavailableWarning, stacklevel=2)
        self.providers: list[str] = self._session.get_providers()
        self.device, self.device_id = placement(self._session)
        self.inputs = [tensor_spec(a) for a in self._session.get_inputs()]
        self.outputs = [tensor_spec(a) for a in self._session.get_outputs()]
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
            self.int8: dict[str, Any] | None = int8_from_metadata(self.metadata)
            """For a model bnfold exported with ``int8=True``: its calibration, float layers and
            measured accuracy (see :meth:`bnfold.report.Int8Report.summary`); ``None`` otherwise."""
            self.image_sizes: dict[str, ImageSizes] = image_sizes_from_metadata(self.metadata)
            """The sizes each image-like input of a dynamic-size model takes, by input name."""
        except (ValueError, KeyError, TypeError, BnfoldError) as exc:
            raise ModelLoadError(
                f"{self.path}: its labels/preprocessing/INT8/image size metadata is malformed ({exc})"
            ) from exc

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying ONNX Runtime session (for advanced use and benchmarks)."""
        return self._session

    # ----------------------------------------------------------------------------- inputs
    def _validate(self, spec: TensorSpec, shape: tuple[int, ...], dtype: object, is_float: bool) -> None:
        # Hot path: every predict call comes here, so nothing is formatted unless it fails.
        if not is_float:
            raise UsageError(f"input '{spec.name}': expected a float array ({spec.dtype}), got dtype {dtype}")
        if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in self._fixed[spec.name]):
            raise spec.shape_error(shape)
        sizes = self.image_sizes.get(spec.name)
        if sizes is not None and not sizes.allows(shape[-2], shape[-1]):
            raise UsageError(
                f"input '{spec.name}': image size {shape[-2]}x{shape[-1]} is not one the model takes: "
                f"{sizes.problem(shape[-2], shape[-1])}"
            )

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
        _same_batch(feeds)
        return feeds

    # ----------------------------------------------------------------------------- batches
    def batch_plan(self, samples: int) -> list[Batch]:
        """How :meth:`run` and :meth:`predict` split ``samples`` samples: one batch when they fit
        the batch size; a static batch axis takes batches of exactly its size, the last one
        padded with copies of its last sample (whose outputs are dropped)."""
        size = self.static_batch or self.batch_size
        if size is None or (samples <= size and not self.static_batch):
            return [Batch(slice(0, samples))]
        if samples == 0:
            raise UsageError(f"empty input (0 rows): this model takes batches of {self.static_batch}")
        return plan_batches(samples, size, pad_last=bool(self.static_batch))

    def _batched(
        self, feeds: dict[str, Any], run: Callable[[dict[str, Any]], list[Any]], join: Callable[[list[Any]], Any]
    ) -> list[Any]:
        """``run`` on ``feeds`` (numpy arrays or torch tensors) batch by batch, outputs joined with ``join``."""
        plan = self.batch_plan(next(iter(feeds.values())).shape[0])
        if len(plan) == 1 and not plan[0].pad:
            return run(feeds)
        return run_in_batches(feeds, plan, run, join)

    def _session_run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own errors: the input does not fit the model
            shapes = ", ".join(f"{k}: {'x'.join(map(str, v.shape))}" for k, v in feeds.items())
            raise UsageError(
                f"{self.path}: ONNX Runtime cannot run inputs of shape {shapes}: {first_line(exc)}"
            ) from exc

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked feeds, split into batches (see :meth:`batch_plan`); outputs in model order."""
        return self._batched(feeds, self._session_run, np.concatenate)

    # ----------------------------------------------------------------------------- predict
    def predict(self, x: Any, *, as_torch: bool = False) -> Any:
        """Numpy in, numpy out for one input and one output; a dict of name -> array otherwise.

        Float inputs are cast to the model's dtype; integer or wrongly shaped inputs raise a
        :class:`UsageError` naming the input. Safe to call from several threads.

        On CUDA, torch tensors (also as dict values) are bound to the session with I/O binding:
        CUDA tensors are read in place, without a host round trip. ``as_torch=True`` returns
        torch tensors (CUDA tensors on the CUDA provider, written in place by ONNX Runtime).
        """
        fast = self._fast
        if (  # the common case: no conversion, no batching, one call into ONNX Runtime
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
        if named is not None and any(is_torch(v) for v in named.values()):
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
            if is_torch(value):
                self._validate(specs[name], tuple(value.shape), str(value.dtype), value.is_floating_point())
        if self.device != "cuda":
            arrays = {k: (v.detach().cpu().numpy() if is_torch(v) else v) for k, v in named.items()}
            outs = self.run(self._feeds(arrays))
            return [torch.from_numpy(o) for o in outs] if as_torch else outs
        device = torch.device("cuda", self.device_id)
        tensors = {
            name: value.detach().to(device=device, dtype=getattr(torch, specs[name].dtype.name)).contiguous()
            if is_torch(value)
            else torch.from_numpy(self.check_input(specs[name], value)).to(device)
            for name, value in named.items()
        }
        _same_batch(tensors)
        return self._batched(
            tensors,
            lambda part: run_bound(self._session, specs, self.outputs, part, self.device_id, as_torch),
            torch.cat if as_torch else np.concatenate,
        )

    def image_preprocessing(self) -> Preprocess:
        """The stored preprocessing that turns image files into inputs of this model; a
        :class:`UsageError` if the model has none (it cannot read images)."""
        if self.preprocess is None:
            raise UsageError(
                f"{self.path} has no preprocessing metadata, so it cannot read images: export it with image "
                "preprocessing (bnfold export --preprocess-*, or ExportOptions.preprocess), or give arrays instead "
                "of image files"
            )
        return self.preprocess

    def predict_images(self, paths: Sequence[str | os.PathLike[str]]) -> Any:
        """Read, resize and normalise image files as the model's preprocessing metadata says
        (:func:`bnfold.export`'s ``preprocess``), then :meth:`predict`. Needs ``bnfold[images]``.

        A dynamic-size model whose preprocessing keeps each image's size runs the images of one
        size together (a batch is never padded): its outputs are joined in the order of
        ``paths`` when they have one shape per image (a classifier's scores), else it returns a
        list with each image's outputs (a batch of one, e.g. a segmentation at the image's size).
        """
        preprocess = self.image_preprocessing()
        paths = list(paths)
        groups = group_by_size(paths, preprocess)
        if len(groups) <= 1:
            return self.predict(load_images(paths, preprocess))
        results: list[Any] = [None] * len(paths)
        for group in groups:
            outs = self.predict(load_images([paths[i] for i in group], preprocess))
            for row, i in enumerate(group):
                results[i] = _row(outs, row)
        return _joined(results)

    def predict_batches(self, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]]) -> Iterator[Any]:
        """Stream :meth:`predict` over an iterable of inputs."""
        for batch in batches:
            yield self.predict(batch)


def _row(outputs: Any, row: int) -> Any:
    """Row ``row`` of :meth:`Predictor.predict`'s outputs (an array, or a dict of them), as a batch of one."""
    if isinstance(outputs, Mapping):
        return {name: value[row : row + 1] for name, value in outputs.items()}
    return outputs[row : row + 1]


def _joined(rows: list[Any]) -> Any:
    """Outputs of one sample each (arrays, or dicts of them), joined along the batch axis when
    every sample's are of one shape; else the list as it is."""
    first = rows[0]
    parts = [list(r.values()) if isinstance(r, Mapping) else [r] for r in rows]
    if any(len({p[i].shape for p in parts}) > 1 for i in range(len(parts[0]))):
        return rows
    joined = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    return dict(zip(first, joined)) if isinstance(first, Mapping) else joined[0]


def _same_batch(values: Mapping[str, Any]) -> None:
    """A :class:`UsageError` unless every input has the same number of samples."""
    sizes = {v.shape[0] for v in values.values()}
    if len(sizes) != 1:
        raise UsageError(f"inputs have different batch sizes: {sorted(sizes)}")
