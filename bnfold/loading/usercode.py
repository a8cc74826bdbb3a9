"""The user's own Python code that loading imports, by the user's choice: the ``arch`` factory,
and (only for a trusted pickle) the classes the pickle names, found like ``python -m`` finds them."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from ..errors import Param, UsageError


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """Like ``python -m``: let the current directory's packages be imported for a while."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Import the factory named by ``package.module:factory`` or ``path/to/file.py:factory``.

    This runs that module's code: only the module the user named is imported.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(Param("arch"), f" {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            file = Path(module_name)
            if not file.is_file():
                raise UsageError(Param("arch"), f" {spec!r}: file {file} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"bnfold_arch_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            with cwd_importable():
                module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            Param("arch"), f" {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(Param("arch"), f" {spec!r}: {module_name} has no callable named {attr!r}")
    return factory
