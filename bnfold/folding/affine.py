"""Constant per-channel affine maps that are not batch-norm ops: ``FrozenBatchNorm2d``
(``x * scale + shift`` from buffers), layer scales (``gamma * x``) and input normalisation
(``(x - mean) / std``).

Such a map is a chain of element-wise ops (``mul``, ``div``, ``add``, ``sub``) on one activation
whose other operand is a stored tensor (or a number) broadcast along the channel axis (dim 1)
only. Each op is ``y = a·x + b`` per channel: ``x·c`` and ``c·x`` give ``(c, 0)``, ``x / c``
gives ``(1/c, 0)``, ``x + c`` ``(1, c)``, ``x − c`` ``(1, −c)``, ``c − x`` ``(−1, c)``; a chain
composes them in float64 (``s₂·(s₁·x + t₁) + t₂``). A site is one module's part of a chain, so
the report names each module (a frozen batch-norm, then a layer scale). The fold rules treat an
:class:`AffineSite` exactly like a batch-norm: ``scale_shift`` is all they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from .ops import aten, module_path, rank
from .store import TensorStore

F64 = torch.float64
AFFINE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor}
# The same ops written in place (timm's ``LayerScale(inplace=True)``): reported, never rewritten.
IN_PLACE_AFFINE_OPS = {
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.div_.Tensor: aten.div.Tensor,
    aten.add_.Tensor: aten.add.Tensor,
    aten.sub_.Tensor: aten.sub.Tensor,
}


def activation_operand(node: fx.Node, constant: object, ops: object = AFFINE_OPS) -> int | None:
    """Which operand (0 or 1) of an element-wise op of ``ops`` is the activation when the other
    is ``constant`` (a predicate on operands), or None when the op is no affine step."""
    if node.op != "call_function" or node.target not in ops or node.kwargs.get("alpha", 1) != 1:
        return None
    if len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and constant(b) and not constant(a):
        return 0
    in_place = node.target in IN_PLACE_AFFINE_OPS  # writes its first operand: that is the activation
    if (
        isinstance(b, fx.Node)
        and constant(a)
        and not constant(b)
        and node.target is not aten.div.Tensor
        and not in_place
    ):
        return 1
    return None


def same_dtype(store: TensorStore, constant: object, activation: fx.Node) -> bool:
    """Whether ``constant`` (a stored tensor's node, or a number) keeps ``activation``'s dtype: a
    tensor constant of another dtype would promote the result (float32 · float64 → float64)."""
    val = activation.meta.get("val")
    if not isinstance(constant, fx.Node) or not isinstance(val, Tensor):
        return True
    return store.dtype(constant) == val.dtype


def per_channel(value: object, channels: int, dims: int) -> Tensor | None:
    """``value`` (a number or a tensor) as a float64 vector over ``channels``, if it broadcasts
    against a ``dims``-D activation along dim 1 only."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=F64)
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() > dims:
        return None
    shape = (1,) * (dims - value.dim()) + tuple(value.shape)
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return value.detach().to(F64).reshape(-1).expand(channels).clone()


@dataclass
class AffineSite:
    """One module's chain of constant per-channel affine ops, read live like a batch-norm site."""

    nodes: list[fx.Node]
    """The ops, in order; ``nodes[0]`` reads the activation, ``nodes[-1]`` gives the result."""
    operands: list[int]
    """Which argument (0 or 1) of each op is the activation."""
    name: str
    kind: str
    num_channels: int = 0
    uses_batch_stats: bool = False
    scale_shift_cache: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    refusal: str | None = None
    """Why no rule may rewrite it (an op written in place, a constant of a wider dtype), if so."""

    @property
    def node(self) -> fx.Node:
        return self.nodes[0]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def source(self) -> fx.Node:
        return self.node.args[self.operands[0]]

    @property
    def tensors(self) -> tuple[object, ...]:
        """The constant operand of each op."""
        return tuple(node.args[1 - i] for node, i in zip(self.nodes, self.operands))

    def channels(self, store: TensorStore) -> int:
        return self.num_channels

    def scale_shift(self, store: TensorStore) -> tuple[Tensor, Tensor]:
        """The chain's float64 ``(s, t)``: ``y = s·x + t`` per channel."""
        if self.scale_shift_cache is None:
            s = torch.ones(self.num_channels, dtype=F64)
            t = torch.zeros(self.num_channels, dtype=F64)
            dims = rank(self.source) or 2
            for node, index, other in zip(self.nodes, self.operands, self.tensors):
                c = per_channel(store.value(other) if isinstance(other, fx.Node) else other, self.num_channels, dims)
                if node.target is aten.mul.Tensor:
                    s, t = s * c, t * c
                elif node.target is aten.div.Tensor:
                    s, t = s / c, t / c
                elif node.target is aten.add.Tensor:
                    t = t + c
                elif index == 0:  # x - c
                    t = t - c
                else:  # c - x
                    s, t = -s, c - t
            self.scale_shift_cache = (s, t)
        return self.scale_shift_cache


def _kind(site: AffineSite, module_class: str | None, store: TensorStore) -> str:
    if module_class and "Norm" in module_class:
        return module_class
    if site.source.op == "placeholder" and not store.is_stored(site.source):
        return "input normalisation"
    if all(IN_PLACE_AFFINE_OPS.get(n.target, n.target) in (aten.mul.Tensor, aten.div.Tensor) for n in site.nodes):
        return "layer scale" if any(store.is_parameter(c) for c in site.tensors) else "per-channel scale"
    return "per-channel affine"


def _stored_names(site: AffineSite, store: TensorStore) -> list[str]:
    return [store.name(c) for c in site.tensors if store.is_stored(c)]


def _refused_site(node: fx.Node, index: int, store: TensorStore, channels: int, dims: int) -> AffineSite | None:
    """A per-channel affine op by a stored tensor that no rule may rewrite, as a site to report:
    one written in place, or one whose constant is of a wider dtype than the activation (it
    promotes the result: folding it would change the output dtype)."""
    other = node.args[1 - index]
    if not store.is_stored(other) or per_channel(store.value(other), channels, dims) is None:
        return None
    if node.target in IN_PLACE_AFFINE_OPS:
        reason = f"it is written in place ('{node.target.__name__.split('.')[0]}'), which bnfold does not rewrite"
    elif not same_dtype(store, other, node.args[index]):
        activation = node.args[index].meta["val"].dtype
        reason = (
            f"its constant is {store.dtype(other)}, the activation {activation}: the result is "
            f"{store.dtype(other)}, and folding would change the output dtype"
        )
    else:
        return None
    return AffineSite([node], [index], node.name, "", channels, refusal=reason)


def affine_sites(graph: fx.Graph, store: TensorStore) -> list[AffineSite]:
    """Every chain of constant per-channel affine ops on a static-channel activation, split by
    module, with at least one stored-tensor operand (a bare ``x * 0.5`` is no site)."""

    def constant(value: object) -> bool:
        return store.is_stored(value) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    sites: list[AffineSite] = []
    taken: set[fx.Node] = set()
    for node in graph.nodes:
        if node in taken:
            continue
        index = activation_operand(node, constant, AFFINE_OPS | IN_PLACE_AFFINE_OPS.keys())
        if index is None:
            continue
        source = node.args[index]
        shape = source.meta.get("val").shape if isinstance(source.meta.get("val"), Tensor) else None
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            continue
        channels, dims, module = int(shape[1]), len(shape), module_path(node)
        refused = _refused_site(node, index, store, channels, dims)
        if refused is not None:
            refused.name = module[0] if module and module[0] else ", ".join(_stored_names(refused, store))
            refused.kind = _kind(refused, module[1] if module and module[0] else None, store)
            sites.append(refused)
            continue
        chain, operands, current = [], [], node
        while True:
            i = activation_operand(current, constant)
            other = None if i is None else current.args[1 - i]
            value = store.value(other) if isinstance(other, fx.Node) else other
            if (
                i is None
                or module_path(current) != module
                or per_channel(value, channels, dims) is None
                or not same_dtype(store, other, current.args[i])
            ):
                break
            chain.append(current)
            operands.append(i)
            users = list(current.users)
            if len(users) != 1 or rank(users[0]) != dims:
                break
            current = users[0]
        site = AffineSite(chain, operands, chain[0].name if chain else "", "", channels)
        if not chain or not any(store.is_stored(c) for c in site.tensors):
            continue
        taken.update(chain)
        site.name = module[0] if module and module[0] else ", ".join(_stored_names(site, store))
        site.kind = _kind(site, module[1] if module and module[0] else None, store)
        sites.append(site)
    return sites
