"""The image sizes a captured program takes: read from the shape guards ``torch.export`` recorded
while tracing the model with free heights and widths.

A captured program is valid for every input on which its guards hold. The guards of a spatial
axis are evaluated (as torch evaluates them) for every size in a window from 1 to twice the
traced size and more. Away from the smallest sizes they repeat with a period (the total stride,
when a decoder concatenates upsampled features with skip connections); the sizes stated are
those of the traced size's class modulo that period, from the smallest after which the whole
class is allowed: ``min + k·multiple_of`` (:class:`bnfold.image_sizes.AxisSizes`), a safe subset of
what the program takes when ``ceil`` rounding allows a few more. A model whose code fixes a size (a hard-coded reshape, a positional embedding of fixed length, a cached grid)
specialises the axis, or allows only sizes near the traced one: it is refused, naming the op
and the model's line that added the guard.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch
from torch import Tensor
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import FoldError, Param
from ..image_sizes import AXES, IMAGE_RANK, AxisSizes, ImageSizes
from .guard_log import GuardLog, GuardSite

# Sizes tried per axis: 1 to twice the traced size plus this.
WINDOW_MARGIN = 64
# A guard allowing none of the window's last this many sizes bounds the axis.
TOP_SIZES = 64

Shapes = list[tuple[int, ...]]


def is_image(x: Tensor) -> bool:
    """Whether ``x`` is image-like (``NxCxHxW``, floating point): its height and width may be dynamic."""
    return x.dim() == IMAGE_RANK and x.is_floating_point()


class _Guards:
    """The captured program's guards on its user inputs, evaluated for concrete input shapes."""

    def __init__(self, program: ExportedProgram, inputs: Sequence[Tensor]) -> None:
        names = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
        nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
        self.names = [n.name for n in nodes]
        self.values = [n.meta["val"] for n in nodes]
        self.env = next(v.fake_mode.shape_env for v in self.values if isinstance(v, torch.Tensor))
        self.code = self.env.produce_guards_expression(self.values)
        self.dtypes = [x.dtype for x in inputs]

    def accept(self, shapes: Shapes) -> bool:
        if self.code is None:
            return True
        args = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in zip(shapes, self.dtypes)]
        return bool(self.env.evaluate_guards_expression(self.code, args))

    def bounding(self, symbols: set[sympy.Symbol], top: range) -> list[sympy.Basic]:
        """The guards on one of ``symbols`` that hold for none of the sizes ``top`` (the other
        symbols at their traced values): the ones that keep the axis near its traced size."""
        hints = {s: sympy.Integer(v) for s, v in self.env.backed_var_to_val.items()}
        found = []
        for guard in self.env.guards:
            symbol = next(iter(guard.expr.free_symbols & symbols), None)
            if symbol is not None and not any(_holds(guard.expr, {**hints, symbol: sympy.Integer(v)}) for v in top):
                found.append(guard.expr)
        return found


def _holds(expr: sympy.Basic, values: dict) -> bool:
    result = expr.xreplace(values)
    return bool(result) if result in (sympy.true, sympy.false) or isinstance(result, bool) else True


def image_sizes(program: ExportedProgram, inputs: Sequence[Tensor], log: GuardLog) -> tuple[ImageSizes | None, ...]:
    """The heights and widths each input of ``program`` (captured from ``inputs`` with free
    spatial axes, its guards recorded in ``log``) takes; ``None`` for an input that is not
    image-like. A :class:`FoldError` naming the op and line when the model fixes a size."""
    guards = _Guards(program, inputs)
    traced: Shapes = [tuple(x.shape) for x in inputs]
    found: list[ImageSizes | None] = []
    for i, x in enumerate(inputs):
        if not is_image(x):
            found.append(None)
            continue
        axes = [_axis_sizes(guards, log, traced, i, axis) for axis in (2, 3)]
        found.append(ImageSizes(axes[0], axes[1], (traced[i][2], traced[i][3])))
    _check_together(guards, traced, found)
    return tuple(found)


def _axis_sizes(guards: _Guards, log: GuardLog, traced: Shapes, index: int, axis: int) -> AxisSizes:
    """The sizes axis ``axis`` of input ``index`` takes, the other axes as traced: the traced
    size's class modulo the period of the allowed sizes (in the upper half of the window, past
    the effects of small sizes), from the smallest size after which the whole class is allowed."""
    size, name = traced[index][axis], f"the {AXES[axis - 2]} of input '{guards.names[index]}'"
    window = range(1, 2 * size + WINDOW_MARGIN + 1)
    dim = guards.values[index].shape[axis]
    if not isinstance(dim, torch.SymInt) or dim.node.expr.is_number:  # specialised: the traced size only
        symbols = {s for s in guards.env.backed_var_to_val if str(s) in log.symbols_of(axis)}
        _refuse(guards, log, symbols, window[-TOP_SIZES:], f"fixes {name} to {size}")
    allowed = {v for v in window if guards.accept(_with(traced, index, axis, v))}
    upper = window[len(window) // 2 :]
    period = next(
        (p for p in range(1, len(upper)) if all((v in allowed) == (v + p in allowed) for v in upper[:-p])), size
    )
    members = [v for v in window if v % period == size % period]
    if not any(v in allowed for v in members if v in upper):
        near = sorted(allowed)
        text = ", ".join(map(str, near[:8])) + (", ..." if len(near) > 8 else "")
        _refuse(guards, log, set(dim.node.expr.free_symbols), window[-TOP_SIZES:], f"lets {name} take only {text}")
    smallest = members[-1]
    for v in reversed(members):
        if v not in allowed:
            break
        smallest = v
    return AxisSizes(smallest, period)


def _with(shapes: Shapes, index: int, axis: int, size: int) -> Shapes:
    out = list(shapes)
    out[index] = (*shapes[index][:axis], size, *shapes[index][axis + 1 :])
    return out


def _refuse(guards: _Guards, log: GuardLog, symbols: set[sympy.Symbol], top: range, what: str) -> None:
    """Raise the refusal: what the model's code does to an axis (whose symbols are ``symbols``),
    and where: the first guard that allows none of the sizes ``top``."""
    culprits = [str(expr) for expr in guards.bounding(symbols, top)]
    site = _site(log, culprits, {str(s) for s in symbols})
    where = site.where() if site is not None else ""
    if not where and culprits:
        where = f" (torch's shape guard `{culprits[0]}`)"
    raise FoldError(
        f"the model cannot take a dynamic image size: its code {what}{where}. Change that code, or export "
        "at the example's size without ",
        Param("dynamic_size", True),
    )


def _site(log: GuardLog, culprits: list[str], symbols: set[str]) -> GuardSite | None:
    """Where the model added the first of the ``culprits`` guards (else the first guard on
    ``symbols`` that replaced one by a value), if the log holds it."""
    sites = log.sites_of(symbols)
    for expr in culprits:
        match = next((site for site in sites if site.expr == expr), None)
        if match is not None:
            return match
    return next((site for site in sites if " = " in site.expr), None)


def _check_together(guards: _Guards, traced: Shapes, found: list[ImageSizes | None]) -> None:
    """Every input at its verification sizes at once must satisfy the guards: each axis was
    found with the others at their traced sizes, so a model tying two axes (height to width,
    one input to another) is refused here."""
    plans = [sizes.verification_sizes() if sizes is not None else [] for sizes in found]
    for k in range(max((len(p) for p in plans), default=0)):
        shapes = [(*shape[:2], *plan[k]) if k < len(plan) else shape for shape, plan in zip(traced, plans, strict=True)]
        if not guards.accept(shapes):
            text = ", ".join(f"'{n}' {s[2]}x{s[3]}" for n, s, p in zip(guards.names, shapes, plans) if p)
            raise FoldError(
                "the model cannot take a dynamic image size: each height and width takes sizes on its own, "
                f"but not together ({text}): its code ties one to another. Export at the example's size "
                "without ",
                Param("dynamic_size", True),
            )
