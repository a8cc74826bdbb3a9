"""The stored tensors of a captured program: read them, add new ones, drop unused ones.

A ``torch.export`` program lifts parameters, buffers and tensor constants into placeholders of its
graph, named by its signature and held in ``state_dict``/``constants``. Folding rewrites the
graph and adds new tensors beside the old ones; it never changes a tensor in place, since the
program shares its tensors with the user's module. New tensors are lifted constants, held exact
(float64, as the fold computed them) until :meth:`TensorStore.finalize` casts each to the dtype of
the tensor it replaces: later rewrites build on the exact values, and the float64 proof runs
them before anything is rounded. A new weight is held as the function that computes it from the
tensors it was folded from (a weight-sized float64 copy of every folded layer at once would double
the model's memory); small tensors are held as values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from ..errors import FoldError
from .ops import mutated

_STORED_KINDS = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
PREFIX = "bnfold_"
F64 = torch.float64


def cast_checked(value: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """``value`` (float64) cast to ``dtype``; a value that overflows it is a FoldError."""
    cast = value.to(dtype)
    if cast.numel() and not all(torch.isfinite(v) for v in torch.aminmax(cast)):  # NaN/inf show in either
        big = float(value.abs().max())
        raise FoldError(
            f"{what} does not fit {dtype} (largest magnitude {big:.3g}): the batch-norm has a "
            "tiny running_var with a large weight; fix the statistics or export in a wider dtype."
        )
    return cast


def lift_dtype(value: object) -> object:
    """A floating dtype argument raised to float64 (``x.float()`` computes in float64 in the
    proof); anything else unchanged."""
    if isinstance(value, torch.dtype) and value.is_floating_point and value != F64:
        return F64
    return value


def to_float64(value: object) -> object:
    """A floating tensor as float64 (the same tensor when it already is); anything else unchanged."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(F64)
    return value


class TensorStore:
    """Parameters, buffers and constants of ``program``, addressed by their graph placeholders."""

    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        self.graph = program.graph_module.graph
        self._counter = 0
        self.pending: dict[str, tuple[torch.dtype, str]] = {}
        """New tensors held in float64: target -> (the dtype they take, what they are, for errors)."""
        self._compute: dict[str, Callable[[], Tensor]] = {}
        """New tensors held as the function that computes their exact value."""
        self._origins: dict[str, tuple[str, bool]] = {}
        """Tensors computed from stored ones: target -> (the names they came from, whether any
        of them is a parameter)."""
        # A buffer the forward changes (in place, or as a declared mutation) is state, not a constant.
        changed = set(program.graph_signature.buffers_to_mutate.values())
        changed |= {n.name for n in self.graph.nodes if n.op == "placeholder" and mutated(n)}
        self._changed = changed
        self._stored = {
            spec.arg.name: spec
            for spec in program.graph_signature.input_specs
            if isinstance(spec.arg, TensorArgument)
            and spec.kind in _STORED_KINDS
            and spec.arg.name not in changed
            and spec.target not in changed
        }

    def _spec(self, node: object) -> InputSpec | None:
        if not (isinstance(node, fx.Node) and node.op == "placeholder"):
            return None
        return self._stored.get(node.name)

    def is_stored(self, node: object) -> bool:
        """Whether ``node`` is a stored tensor (not computed at run time, not a model input)."""
        return self._spec(node) is not None

    def is_stored_or_absent(self, node: object) -> bool:
        """Whether ``node`` is ``None`` (an absent bias) or a stored tensor."""
        return node is None or self.is_stored(node)

    def is_parameter(self, node: object) -> bool:
        """Whether ``node`` is a stored trainable parameter (not a buffer or a constant), or was
        computed from one (``gamma[:, None, None]``)."""
        spec = self._spec(node)
        return spec is not None and (spec.kind == InputKind.PARAMETER or self._origins.get(spec.target, ("", False))[1])

    def name(self, node: fx.Node) -> str:
        """A stored tensor's name for the report: its state-dict name, or for a tensor computed
        from stored ones (``self.gamma[:, None, None]``, ``weight * mask``), theirs."""
        target = self.target(node)
        return self._origins.get(target, (target, False))[0]

    def derive(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """Record that the stored tensor ``node`` was computed from the stored ``sources``."""
        names = [self.name(n) for n in sources if self.is_stored(n)]
        if names:
            self._origins[self.target(node)] = (", ".join(names), any(self.is_parameter(n) for n in sources))

    def target(self, node: fx.Node) -> str:
        """The state-dict name of a stored tensor (``layer1.0.conv1.weight``)."""
        return self._spec(node).target

    def value(self, node: fx.Node) -> Tensor:
        """The tensor a stored-tensor placeholder stands for (a new one's exact float64 value)."""
        target = self.target(node)
        if target in self._compute:
            return self._compute[target]()
        if target in self.program.state_dict:
            return self.program.state_dict[target]
        return self.program.constants[target]

    def like(self, node: fx.Node) -> Tensor:
        """A tensor of the stored tensor's shape (its recorded fake value), without computing a
        new tensor's value."""
        val = node.meta.get("val")
        return val if isinstance(val, Tensor) else self.value(node)

    def source(self, node: fx.Node | None) -> Callable[[], Tensor | None]:
        """A function giving the value :meth:`value` gives now, whatever becomes of ``node``
        later (a rewrite that builds on it captures this, not the node)."""
        if node is None:
            return lambda: None
        target = self.target(node)
        if target in self._compute:
            return self._compute[target]
        value = self.value(node)
        return lambda: value

    def exact_values(self) -> dict[str, Callable[[], Tensor]]:
        """The new tensors held as functions, by target (for the proof to compute one at a time)."""
        return dict(self._compute)

    def dtype(self, node: fx.Node) -> torch.dtype:
        """The dtype of a stored tensor in the folded program (a new tensor's, once cast)."""
        pending = self.pending.get(self.target(node))
        return pending[0] if pending else self.value(node).dtype

    def add(
        self,
        value: Tensor,
        suffix: str,
        dtype: torch.dtype | None = None,
        what: str = "",
        compute: Callable[[], Tensor] | None = None,
    ) -> fx.Node:
        """A new stored tensor holding ``value``, as a placeholder before the model inputs. With
        ``dtype`` (other than ``value``'s), ``value`` stays exact until :meth:`finalize` casts it;
        ``what`` names it in the error if it does not fit. With ``compute`` (a function giving
        ``value`` again), only the function is held until then."""
        value = value.detach()
        dtype = dtype or value.dtype
        names = set(self.program.state_dict) | set(self.program.constants)
        while f"{PREFIX}{self._counter}_{suffix}" in names:
            self._counter += 1
        target = f"{PREFIX}{self._counter}_{suffix}"
        self._counter += 1
        specs = self.program.graph_signature.input_specs
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        # Placeholders follow the signature's order: stored tensors first, then the model inputs.
        index = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
        anchor = placeholders[index] if index < len(placeholders) else placeholders[-1].next
        with self.graph.inserting_before(anchor):
            node = self.graph.placeholder(target)
        fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
        like = value if dtype == value.dtype else torch.empty(value.shape, dtype=dtype)
        node.meta["val"] = fake_mode.from_tensor(like, static_shapes=True) if fake_mode else like
        spec = InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(node.name), target)
        specs.insert(index, spec)
        self._stored[node.name] = spec
        self.program.constants[target] = value
        if dtype != value.dtype:
            self.pending[target] = (dtype, what or f"the folded tensor '{target}'")
            if compute is not None:
                self._compute[target] = compute
                self.program.constants[target] = torch.empty(value.shape, dtype=dtype, device="meta")
        return node

    def own_changed_state(self) -> None:
        """Give the program its own copy of every tensor its forward changes (a counter, batch
        statistics updated at test time), so that running the folded program never writes to
        the user's model, with which it shares its other tensors."""
        for spec in self.program.graph_signature.input_specs:
            if spec.target is None or not (spec.arg.name in self._changed or spec.target in self._changed):
                continue
            for table in (self.program.state_dict, self.program.constants):
                if spec.target in table and isinstance(table[spec.target], Tensor):
                    table[spec.target] = table[spec.target].detach().clone()

    def finalize(self) -> None:
        """Cast every new tensor still held in float64 to its dtype, one at a time (the float64
        value is released as its cast is stored); one that overflows is a FoldError."""
        for target, (dtype, what) in list(self.pending.items()):
            compute = self._compute.pop(target, None)
            value = compute() if compute is not None else self.program.constants[target]
            self.program.constants[target] = cast_checked(value, dtype, what)
            del self.pending[target]

    def drop_unused(self) -> None:
        """Remove stored tensors that no op reads any more, from the graph and the program."""
        specs = self.program.graph_signature.input_specs
        for node in [n for n in self.graph.nodes if n.op == "placeholder" and not n.users]:
            spec = self._spec(node)
            if spec is None:
                continue
            specs.remove(spec)
            del self._stored[node.name]
            self.graph.erase_node(node)
            if not any(s.target == spec.target for s in specs):
                self.program.state_dict.pop(spec.target, None)
                self.program.constants.pop(spec.target, None)
                self.pending.pop(spec.target, None)
                self._compute.pop(spec.target, None)


def constant_tensor(store: TensorStore, node: object, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` is computed from stored tensors only (no model input, nothing random)."""
    if not isinstance(node, fx.Node):
        return False
    if node not in memo:
        if node.op == "placeholder":
            memo[node] = store.is_stored(node)
        elif node.op == "call_function" and not node.is_impure() and "rand" not in str(node.target):
            memo[node] = all(constant_tensor(store, n, memo) for n in node.all_input_nodes)
        else:
            memo[node] = False
    return memo[node]


def evaluate(store: TensorStore, node: fx.Node) -> object:
    """The value of a node that :func:`constant_tensor` accepted, computed eagerly in float64
    (floating tensors and dtype arguments raised to it), as the float64 proof computes it."""
    if node.op == "placeholder":
        return to_float64(store.value(node))
    lift = lambda a: evaluate(store, a) if isinstance(a, fx.Node) else lift_dtype(a)
    args = torch.utils._pytree.tree_map(lift, node.args)
    kwargs = torch.utils._pytree.tree_map(lift, node.kwargs)
    with torch.no_grad():
        return node.target(*args, **kwargs)
