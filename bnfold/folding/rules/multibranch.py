"""Multi-branch blocks summed by an Add (RepVGG, MobileOne, RepGhost): one conv.

After the batch-norm rules, such a block reads ``conv_kxk(x) + conv_1x1(x) + bn(x)`` (each conv
with its batch-norm already folded), optionally with ``bn(avg_pool(x))`` or a bare ``x``. Every
branch is linear in ``x``, so the sum is one k×k conv with bias (structural
re-parameterisation): ``W = Σ pad_to_k(W_b)`` with smaller kernels padded to the centre,
identity and average-pool branches as per-channel kernels (``s[i]`` at the centre of channel
``i``'s own kernel, or ``s[i]/|pool|`` over the pool window), and ``b = Σ b_b + Σ t_b``. Exact
when the convs share stride, groups and channel counts, are undilated and centred on the
largest kernel, and identity/pool branches keep the size (odd kernel, "same" padding, stride 1;
a pool its own stride). This rule matches an Add, not a batch-norm: it runs after the others.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
from torch import fx

from ...report import FOLDED, BatchNormEntry
from .. import math as fold_math
from ..affine import activation_operand, per_channel, same_dtype
from ..ops import ADDS, AVG_POOLS, arg, aten, channels_of, mutated, rank
from ..sites import SHARED_NOTE, BatchNormSite, GraphEdit, WeightLayer, batchnorm_site, weight_layer
from . import BLOCK, BlockRefusal, Rule, register

CATEGORY = "multi-branch block that cannot be merged"


@dataclass
class Branch:
    term: fx.Node
    source: fx.Node
    """The tensor this branch reads (the block input)."""
    layer: WeightLayer | None = None
    site: BatchNormSite | None = None
    pool: fx.Node | None = None
    coeff: torch.Tensor | None = None
    """Per-channel float64 factor of the branch in the sum (``None``: 1): a subtracted branch
    has −1, a branch under a layer scale ``c·(...)`` has ``c``."""


@dataclass
class Match:
    root: fx.Node
    inner: list[fx.Node]
    """The sum's own ops (adds, subs, per-channel scales), root first."""
    scales: list[fx.Node]
    """The per-channel scale ops among them (layer scales, reported as merged)."""
    branches: list[Branch]
    main: WeightLayer
    kernel: tuple[int, ...]

    @property
    def batchnorms(self) -> tuple[fx.Node, ...]:
        """The batch-norm ops of its identity and pool branches."""
        return tuple(b.site.node for b in self.branches if b.site is not None)

    @property
    def into(self) -> str:
        """What the block merges into, for messages."""
        return f"{self.main.kind} '{self.main.name}'"


def _is_sum(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ADDS


def roots(graph: fx.Graph) -> list[fx.Node]:
    """The Adds that end an Add tree (their single user is not another Add)."""
    return [n for n in graph.nodes if _is_sum(n) and not (len(n.users) == 1 and _is_sum(next(iter(n.users))))]


def _linear_terms(
    root: fx.Node, edit: GraphEdit
) -> tuple[list[tuple[fx.Node, torch.Tensor | None]], list[fx.Node], list[fx.Node]]:
    """The summands of the linear combination ``root`` ends, each with its per-channel factor:
    plain or in-place adds in any order (a scalar 0 is no summand: ``out = 0; out += b(x)``),
    subtractions, and multiplications by a stored per-channel tensor (a layer scale:
    ``x + gamma * (mixer(x) - norm(x))``). Also the sum's own ops, root first, and its scales."""
    terms: list[tuple[fx.Node, torch.Tensor | None]] = []
    inner: list[fx.Node] = []
    scales: list[fx.Node] = []
    dims = rank(root) or 0
    channels = channels_of(root)

    def times(coeff: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
        return factor if coeff is None else coeff * factor

    def collect(node: fx.Node, coeff: torch.Tensor | None) -> None:
        operands = node.args[:2] if node.op == "call_function" and arg(node, 2, "alpha", 1) == 1 else ()
        own = node is root or len(node.users) == 1
        scale = activation_operand(node, edit.store.is_stored) if node.target is aten.mul.Tensor else None
        factor = None
        if (
            scale is not None
            and channels is not None
            and same_dtype(edit.store, node.args[1 - scale], node.args[scale])
        ):
            factor = per_channel(edit.store.value(node.args[1 - scale]), channels, dims)
        # An in-place add changes its first operand: only a tensor nothing else reads may be summed away.
        in_place_ok = node.target is not aten.add_.Tensor or (
            bool(operands) and isinstance(operands[0], fx.Node) and len(operands[0].users) == 1
        )
        distinct = len(operands) == 2 and operands[0] is not operands[1]
        if (
            own
            and _is_sum(node)
            and distinct
            and in_place_ok
            and all(isinstance(a, fx.Node) or a == 0 for a in operands)
        ):
            inner.append(node)
            for a in operands:
                if isinstance(a, fx.Node):
                    collect(a, coeff)
        elif own and node.target is aten.sub.Tensor and distinct and all(isinstance(a, fx.Node) for a in operands):
            inner.append(node)
            collect(operands[0], coeff)
            collect(operands[1], times(coeff, -torch.ones(channels or 1, dtype=torch.float64)))
        elif own and node is not root and factor is not None:
            inner.append(node)
            scales.append(node)
            collect(node.args[scale], times(coeff, factor))
        else:
            terms.append((node, coeff))

    collect(root, None)
    return terms, inner, scales


def _classify(term: fx.Node, coeff: torch.Tensor | None, edit: GraphEdit) -> Branch:
    branch = _branch(term, edit)
    branch.coeff = coeff
    return branch


def _branch(term: fx.Node, edit: GraphEdit) -> Branch:
    layer = weight_layer(term, edit.store)
    if layer is not None and layer.kind.startswith("Conv") and not layer.transposed:
        return Branch(term, term.args[0], layer=layer)
    bn_node = term.args[0] if term.target is operator.getitem and term.args else term
    site = batchnorm_site(bn_node, edit.store) if isinstance(bn_node, fx.Node) else None
    if site is not None and not site.uses_batch_stats:
        source = site.source
        if source.target in AVG_POOLS:
            return Branch(term, source.args[0], site=site, pool=source)
        return Branch(term, source, site=site)
    if term.op == "call_function" and term.target in AVG_POOLS:
        return Branch(term, term.args[0], pool=term)
    return Branch(term, term)  # a bare identity term: the block input itself


def _ints(value: object, dims: int, default: int) -> tuple[int, ...]:
    if value is None or value == []:
        return (default,) * dims
    values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values * dims if len(values) == 1 else values


def _conv_geometry(layer: WeightLayer, edit: GraphEdit) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) of a conv layer."""
    kernel = tuple(edit.store.like(layer.weight).shape[2:])
    dims = len(kernel)
    stride = _ints(arg(layer.node, 3, "stride", 1), dims, 1)
    padding = arg(layer.node, 4, "padding", 0)
    if isinstance(padding, str):
        padding = tuple((k - 1) // 2 for k in kernel) if padding == "same" else (0,) * dims
    dilation = _ints(arg(layer.node, 5, "dilation", 1), dims, 1)
    return kernel, stride, _ints(padding, dims, 0), dilation


def _pool_problem(pool: fx.Node, kernel: tuple[int, ...], stride: tuple[int, ...]) -> str | None:
    dims = len(kernel)
    k = _ints(arg(pool, 1, "kernel_size", 1), dims, 1)
    s = _ints(arg(pool, 2, "stride", None), dims, 0) if arg(pool, 2, "stride", None) else k
    p = _ints(arg(pool, 3, "padding", 0), dims, 0)
    if (
        arg(pool, 4, "ceil_mode", False)
        or not arg(pool, 5, "count_include_pad", True)
        or arg(pool, 6, "divisor_override")
    ):
        return (
            "the average pool branch does not divide by the full kernel (ceil_mode/count_include_pad/divisor_override)"
        )
    if s != stride or any(ki > kk or ki % 2 == 0 or pi != (ki - 1) // 2 for ki, kk, pi in zip(k, kernel, p)):
        return f"the average pool branch (kernel {k}, stride {s}, padding {p}) does not line up with the convs"
    return None


def _problem(branches: list[Branch], convs: list[Branch], main: int, edit: GraphEdit) -> str | None:
    if any(len(b.term.users) != 1 for b in branches if b.term is not b.source):  # a bare identity is the input
        return "a branch output is also used elsewhere"
    if mutated(branches[0].source):
        return "the block input is changed in place, so its branches may read different values"
    problem = next((p for p in (edit.stored_layer_problem(c.layer) for c in convs) if p), None)
    if problem:
        return problem
    geometry = [_conv_geometry(c.layer, edit) for c in convs]
    kernel, stride, padding, _ = geometry[main]
    weights = [edit.store.like(c.layer.weight) for c in convs]
    ref, groups = weights[main], convs[main].layer.groups
    for c, (k, s, p, d), w in zip(convs, geometry, weights):
        if c.layer.groups != groups or w.shape[:2] != ref.shape[:2]:
            return f"{c.layer.kind} '{c.layer.name}' has other groups or channel counts than the main branch"
        if s != stride:
            return f"{c.layer.kind} '{c.layer.name}' has stride {s}, the main branch {stride}"
        if any(dd != 1 for dd in d):
            return f"{c.layer.kind} '{c.layer.name}' is dilated"
        if any(ki > kk for kk, ki in zip(kernel, k)):
            return f"{c.layer.kind} '{c.layer.name}' has kernel {k}, not inside the main branch's {kernel}"
        if any((kk - ki) % 2 or pi + (kk - ki) // 2 != pk for kk, ki, pi, pk in zip(kernel, k, p, padding)):
            return f"{c.layer.kind} '{c.layer.name}' is not centred on the main branch's kernel (padding {p})"
    channel_wise = [b for b in branches if b.layer is None]
    if channel_wise:
        out_ch, cin_per_group = ref.shape[0], ref.shape[1]
        in_ch = cin_per_group * groups
        if out_ch != in_ch or out_ch // groups != cin_per_group:
            return f"an identity branch needs as many output as input channels per group ({in_ch} in, {out_ch} out)"
        if any(kk % 2 == 0 or pk != (kk - 1) // 2 for kk, pk in zip(kernel, padding)):
            return "an identity branch needs the main kernel to keep the size (odd kernel, 'same' padding)"
    for b in channel_wise:
        if b.pool is None and any(si != 1 for si in stride):
            return f"an identity branch needs stride 1 (the convs have stride {stride})"
        problem = _pool_problem(b.pool, kernel, stride) if b.pool is not None else None
        if problem:
            return problem
    return None


def match(root: fx.Node, edit: GraphEdit) -> Match | BlockRefusal | None:
    """The block an Add tree ends, if it is one: every summand a branch over one input."""
    terms, inner, scales = _linear_terms(root, edit)
    if len(terms) < 2:
        return None
    branches = [_classify(t, coeff, edit) for t, coeff in terms]
    # A summand that is the input of the conv branches is the identity branch, even when it is
    # itself a conv's output: conv_a(y) + conv_b(y) + y with y = stem(x).
    inputs = {b.source for b in branches if b.layer is not None}
    branches = [Branch(b.term, b.term, coeff=b.coeff) if b.term in inputs else b for b in branches]
    convs = [b for b in branches if b.layer is not None]
    if not convs or any(b.source is not convs[0].source for b in branches):
        return None  # not a block over one input (e.g. a plain residual of two paths)
    kernels = [
        tuple(edit.store.like(c.layer.weight).shape[2:]) if edit.store.is_stored(c.layer.weight) else () for c in convs
    ]
    main = max(range(len(convs)), key=lambda i: math.prod(kernels[i]))
    problem = _problem(branches, convs, main, edit)
    if problem:
        sites = tuple(b.site.node for b in branches if b.site is not None)
        return BlockRefusal(f"in a multi-branch block that cannot be merged: {problem}", CATEGORY, sites)
    return Match(root, inner, scales, branches, convs[main].layer, kernels[main])


def rewrite(m: Match, edit: GraphEdit) -> bool:
    """Merge the block into its main conv; returns whether that conv's weights were shared."""
    main, kernel = m.main, m.kernel
    ref = edit.store.like(main.weight)
    out_channels, cin_per_group = ref.shape[0], ref.shape[1]
    # Each branch's contribution, from what its tensors are now: (coeff, weight source, bias
    # source) for a conv, (coeff, per-channel scale, shift, pool box) for an identity or pool.
    convs, channel_wise = [], []
    for b in m.branches:
        coeff = torch.ones(out_channels, dtype=torch.float64) if b.coeff is None else b.coeff
        if b.layer is not None:
            convs.append((coeff, *edit.layer_sources(b.layer)))
            continue
        scale, shift = b.site.scale_shift(edit.store) if b.site is not None else (1.0, None)
        values = None
        if b.pool is not None:
            k = _ints(arg(b.pool, 1, "kernel_size", 1), len(kernel), 1)
            box = torch.full((1, 1, *k), 1.0 / math.prod(k), dtype=torch.float64)
            values = fold_math.pad_kernel(box, kernel)[0, 0]
        channel_wise.append((coeff, scale, shift, values))

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.zeros(out_channels, cin_per_group, *kernel, dtype=torch.float64)
        bias = torch.zeros(out_channels, dtype=torch.float64)
        for coeff, w, b_ in convs:
            weight += coeff.reshape(-1, *[1] * (weight.dim() - 1)) * fold_math.pad_kernel(w(), kernel)
            if b_() is not None:
                bias += coeff * b_().to(torch.float64)
        for coeff, scale, shift, values in channel_wise:
            weight += fold_math.channel_kernel(coeff * scale, cin_per_group, kernel, values)
            if shift is not None:
                bias += coeff * shift
        return weight, bias

    shared = edit.set_weights(main, compute, f"merging the branches of {main.kind} '{main.name}'")
    m.root.replace_all_uses_with(main.node)
    for node in m.inner:  # root first: each op's only user is the one before it
        edit.graph.erase_node(node)
    for b in m.branches:
        if b.term is not main.node:
            edit.erase_unused(b.term)
    return shared


def report_merge(
    m: Match, entries: list[BatchNormEntry], index_of: dict[fx.Node, int], into: list[set[fx.Node]], shared: bool
) -> None:
    """Update the report for a merged block: batch-norms folded into any of its conv calls
    (``into[i]``: the calls entry ``i`` went into) now live in the main conv, and its
    identity/pool batch-norm and layer-scale branches are folded into it."""
    main = m.main
    calls = {b.layer.node for b in m.branches if b.layer is not None}
    suffix = f"; parallel branches merged into {main.kind} '{main.name}'"
    for i, entry in enumerate(entries):
        if entry.status == FOLDED and into[i] & calls:
            pattern = entry.pattern or ""
            entries[i] = replace(
                entry, into=main.name, pattern=pattern if pattern.endswith(suffix) else pattern + suffix
            )
            into[i] = {main.node}
    merged_sites = [
        (b.site.node, "average pool → BN" if b.pool is not None else "identity BN") for b in m.branches if b.site
    ]
    for node, what in [*merged_sites, *((scale, "layer scale") for scale in m.scales)]:
        if node in index_of:
            pattern = f"{what} branch merged into {main.kind} (multi-branch re-parameterisation)"
            i = index_of[node]
            into[i] = {main.node}
            entries[i] = replace(
                entries[i],
                status=FOLDED,
                into=main.name,
                pattern=pattern + (SHARED_NOTE if shared else ""),
                reason=None,
                category=None,
            )


register(Rule("multibranch", BLOCK, 10, match, rewrite, candidates=roots, report=report_merge))
