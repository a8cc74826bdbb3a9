"""Torch tensors through ONNX Runtime's I/O binding on CUDA: inputs read in place, outputs
written in place into new CUDA tensors or copied to numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import onnxruntime as ort

from .specs import TensorSpec


def is_torch(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def run_bound(
    session: ort.InferenceSession,
    inputs: Mapping[str, TensorSpec],
    outputs: Sequence[TensorSpec],
    tensors: Mapping[str, Any],
    device_id: int,
    as_torch: bool,
) -> list[Any]:
    """One run of ``session`` on contiguous CUDA ``tensors`` of the inputs' dtypes (by input
    name), outputs in model order: CUDA tensors written in place when ``as_torch`` and the
    output's shape is known, else ONNX Runtime's outputs (copied into CUDA tensors if ``as_torch``)."""
    import torch

    device = torch.device("cuda", device_id)
    n = next(iter(tensors.values())).shape[0]
    binding = session.io_binding()  # one binding per call: thread-safe
    for name, t in tensors.items():
        binding.bind_input(name, "cuda", device_id, inputs[name].dtype, tuple(t.shape), t.data_ptr())
    bound: list[Any] = []
    for spec in outputs:
        shape = spec.shape_for(n)
        if as_torch and shape is not None:
            out = torch.empty(shape, dtype=getattr(torch, spec.dtype.name), device=device)
            binding.bind_output(spec.name, "cuda", device_id, spec.dtype, shape, out.data_ptr())
            bound.append(out)
        else:
            binding.bind_output(spec.name, "cuda", device_id)
            bound.append(None)
    torch.cuda.current_stream(device).synchronize()  # inputs written on torch's stream are ready
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    results = []
    for out, value in zip(bound, binding.get_outputs()):
        if out is None:
            out = value.numpy()
            out = torch.from_numpy(out).to(device) if as_torch else out
        results.append(out)
    return results
