"""A state_dict applied to the module that the ``arch`` factory builds with ``arch_kwargs``:
wrapper prefixes stripped, every difference between the two listed before anything is copied."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, Param, UsageError
from .usercode import resolve_factory

# Key prefixes added by wrappers: nn.DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of names to tensors."""
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def build_module(arch: str, arch_kwargs: Mapping[str, Any] | None) -> nn.Module:
    """The module that the ``arch`` factory returns when called with ``arch_kwargs``."""
    factory = resolve_factory(arch)
    kwargs = dict(arch_kwargs or {})
    try:
        module = factory(**kwargs)
    except Exception as exc:
        raise UsageError(
            Param("arch"),
            f" {arch!r}: calling it with ",
            Param("arch_kwargs"),
            f" {kwargs} failed: {type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(Param("arch"), f" {arch!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _without_wrapper_prefixes(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the prefixes of DataParallel / torch.compile removed, possibly both
    (``_orig_mod.module.``), where every key has one and the module's own keys do not."""
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _differences(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, each kind as one phrase."""
    # torch itself accepts batch-norms without num_batches_tracked (older checkpoints).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return [
        f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs arch)", mismatched),
        )
        if keys
    ]


def apply_state_dict(
    path: Path, state: Mapping[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any] | None
) -> nn.Module:
    """The ``arch`` module (built with ``arch_kwargs``) holding the tensors of ``state``, read
    from ``path``; a :class:`ModelLoadError` listing every key or shape that does not match."""
    module = build_module(arch, arch_kwargs)
    expected = module.state_dict()
    state = _without_wrapper_prefixes(state, expected)
    problems = _differences(state, expected)
    if problems:
        raise ModelLoadError(f"{path} does not match ", Param("arch"), f" {arch}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module
