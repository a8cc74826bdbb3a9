"""Where the model's code constrains an input dimension: the shape guards ``torch.export`` adds
while it traces the model, each with the line of the model that asked and the op being traced.

torch's shape environment logs every guard it adds (``eval Eq(s0, 2) [guard added]``) and every
symbol it creates (``create_symbol s0 = 2 for L['x'].size()[0]``) while the model's code runs
under tracing; the Python stack at that moment ends in the line of the model that asked, below
the op being traced (``aten.reshape.default``) and the module whose forward runs. A
:class:`GuardLog` installed around a capture records them (the capture's output is unchanged).
"""

from __future__ import annotations

import logging
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import torch
from torch import nn

_SHAPES_LOGGER = "torch.fx.experimental.symbolic_shapes"
# Frames in these folders are never the model's code: torch, bnfold, the standard library, sympy.
_NOT_USER_CODE = tuple(
    str(Path(p).resolve())
    for p in (
        Path(torch.__file__).parent,
        Path(__file__).parent.parent,
        sysconfig.get_paths()["stdlib"],
        Path(__import__("sympy").__file__).parent,
    )
)
_SYMBOL = re.compile(r"\b[su]\d+\b")


def _user_frame(stack: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame of ``stack`` in the model's own code."""
    for frame in reversed(stack):
        if not str(Path(frame.filename).resolve()).startswith(_NOT_USER_CODE):
            return frame
    return None


@dataclass(frozen=True)
class GuardSite:
    """One guard torch added while tracing: its expression as torch logs it (``Eq(s53, 32)``, or
    ``s53 = 32`` for a symbol replaced by a value), the model's line that asked (``None`` when
    no line of the model's own code is on the stack), the outermost op being traced and the
    submodule (qualified name) whose forward ran it."""

    expr: str
    frame: traceback.FrameSummary | None
    op: str | None
    module: str | None

    @property
    def symbols(self) -> set[str]:
        return set(_SYMBOL.findall(self.expr))

    def line(self) -> str | None:
        """``file:line (`code`)`` of the model's code, if any."""
        if self.frame is None:
            return None
        code = (self.frame.line or "").strip()
        return f"{self.frame.filename}:{self.frame.lineno}" + (f" (`{code}`)" if code else "")

    def where(self) -> str:
        """`` in OP (module `name`) at FILE:LINE (`code`)``, of what is known."""
        text = f" in {self.op}" if self.op else ""
        text += f" (module `{self.module}`)" if self.module else ""
        line = self.line()
        return text + (f" at {line}" if line else "")


class GuardLog(logging.Handler):
    """Records every guard added and symbol created while it is entered (a context manager);
    ``module`` (the model traced) names the submodules in :attr:`sites`."""

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__(logging.INFO)
        self.names = {id(m): name for name, m in module.named_modules() if name} if module is not None else {}
        self.sources: dict[str, str] = {}
        """Symbol -> what it stands for (``L['x'].size()[2]``)."""
        self.sites: list[GuardSite] = []
        self._depth = 0
        self._logger = logging.getLogger(_SHAPES_LOGGER)
        self._saved = self._logger.handlers, self._logger.level, self._logger.propagate

    def __enter__(self) -> GuardLog:
        self._depth = len(traceback.extract_stack())  # frames up to here are the caller's
        self._saved = self._logger.handlers, self._logger.level, self._logger.propagate
        self._logger.handlers, self._logger.propagate = [self], False  # recorded, never printed
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        handlers, level, propagate = self._saved
        self._logger.handlers, self._logger.propagate = handlers, propagate
        self._logger.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        created = re.match(r"create_symbol (\w+) = \S+ for (\S+)", message)
        if created:
            self.sources[created.group(1)] = created.group(2)
            return
        added = re.match(r"eval (.*) \[guard added\]", message)
        replaced = re.match(r"set_replacement (\w+ = \S+)", message)
        if not added and not replaced:
            return
        frame = _user_frame(traceback.extract_stack()[self._depth :])
        op, module = self._op_and_module(sys._getframe())
        self.sites.append(GuardSite((added or replaced).group(1), frame, op, module))

    def _op_and_module(self, frame: FrameType | None) -> tuple[str | None, str | None]:
        """The outermost aten op on the stack (the one the model's code called) and the innermost
        named submodule whose code is running."""
        op = module = None
        while frame is not None:
            for value in (frame.f_locals.get("func"), frame.f_locals.get("self")):
                if isinstance(value, torch._ops.OpOverload):
                    op = str(value).removesuffix(".default")
                elif module is None and isinstance(value, nn.Module) and id(value) in self.names:
                    module = self.names[id(value)]
            frame = frame.f_back
        return op, module

    def sites_of(self, symbols: set[str]) -> list[GuardSite]:
        """The recorded guards that involve any of ``symbols``, in the order they were added."""
        return [site for site in self.sites if site.symbols & symbols]

    def symbols_of(self, axis: int) -> set[str]:
        """The symbols created for dimension ``axis`` of any input."""
        return {name for name, source in self.sources.items() if source.endswith(f".size()[{axis}]")}
