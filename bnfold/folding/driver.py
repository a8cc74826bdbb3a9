"""The fold pass: every batch-norm of a captured program is folded by the first registered rule
(:mod:`.rules`) that matches it, or kept with the reasons of every rule that refused it; then
blocks of parallel branches are merged. The driver knows no rule by name. The program is
rewritten in place; tensors are added, never changed. Each rewrite is named by the graph node
it starts from (a batch-norm, an affine map's first op, a merged Add), so that the float64 proof
can undo one by passing its name in ``skip``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from torch import Tensor, fx
from torch.export import ExportedProgram

from ..report import KEPT, BatchNormEntry, FoldReport
from .affine import affine_sites
from .ops import BATCHNORM_OPS, mutated, op_name
from .prepare import check_statistics, drop_no_ops, store_computed_parameters, store_constant_batchnorms
from .rules import BLOCK, INPUT, OUTPUT, BlockRefusal, Refusal, RuleSet, select
from .sites import BatchNormSite, GraphEdit, Site, batchnorm_site, describe_source, kept_entry
from .store import TensorStore

PROOF_CATEGORY = "float64 proof failed"


@dataclass
class FoldPass:
    """What one fold pass did: the report, the rewrites applied in order (their node names), and
    the store whose new tensors :meth:`TensorStore.finalize` casts once the fold is proven."""

    report: FoldReport
    store: TensorStore
    applied: list[str] = field(default_factory=list)
    undone_merges: list[str] = field(default_factory=list)
    """The multi-branch merges ``skip`` named, by the conv they would have merged into."""

    @property
    def undone(self) -> list[str]:
        """What ``skip`` undid: the batch-norms it kept and the merges it left out."""
        kept = [e.name for e in self.report.entries if e.category == PROOF_CATEGORY]
        return kept + self.undone_merges

    @property
    def program(self) -> ExportedProgram:
        """The folded program."""
        return self.store.program

    def finalize(self) -> None:
        """Cast the new tensors, held exact in float64, to their dtypes."""
        self.store.finalize()

    def exact_values(self) -> dict[str, Callable[[], Tensor]]:
        """The new tensors held as functions giving their exact value, by target."""
        return self.store.exact_values()


def _preconditions(site: Site, store: TensorStore) -> str | None:
    """Why no rule can fold the batch-norm, whatever its neighbours, if so."""
    if not isinstance(site, BatchNormSite):
        return site.refusal  # an affine map's constants are stored by construction
    if site.uses_batch_stats:
        if site.mean is not None and site.var is not None:
            return "called with training=True: it normalises with batch statistics at inference"
        return "track_running_stats=False: it normalises with batch statistics at inference"
    returns_tuple = BATCHNORM_OPS.get(site.node.target, (None, 0, True))[2]
    if site.output is site.node and returns_tuple:
        return "its saved mean/invstd outputs are used elsewhere"
    if not all(store.is_stored_or_absent(r) for r in site.tensors):
        return "its parameters are computed at run time, not stored"
    return None


def _apply_first(rules: RuleSet, side: str, site: Site, edit: GraphEdit) -> tuple[object, list[Refusal]]:
    """Try every rule of ``side`` on ``site`` in priority order: the first match is rewritten,
    and its result (the report entry, with its match) returned; else ``None`` and every refusal."""
    refusals = []
    for rule in rules.of(side):
        found = rule.match(site, edit)
        if isinstance(found, Refusal):
            refusals.append(found)
        elif found is not None:
            return (rule.rewrite(found, edit), found), refusals
    return None, refusals


def _input_side_default(site: Site) -> Refusal:
    users = list(site.output.users)
    if len(users) != 1:
        return Refusal(f"its output feeds {len(users)} ops")
    return Refusal(f"its output feeds '{op_name(users[0])}', not a conv/linear layer")


def fold_site(
    site: Site, edit: GraphEdit, rules: RuleSet, skip: Mapping[str, str] | None = None
) -> tuple[BatchNormEntry, set[fx.Node]]:
    """Fold one batch-norm by the first of ``rules`` that matches it, or keep it with every
    reason (or the reason ``skip`` gives for its node); also the weight-layer calls it was folded
    into (for the report of a later merge)."""
    site.num_channels = site.channels(edit.store)
    if skip and site.node.name in skip:
        return kept_entry(site, skip[site.node.name], PROOF_CATEGORY), set()
    reason = _preconditions(site, edit.store)
    if reason:
        return kept_entry(site, reason), set()
    done, output_refusals = _apply_first(rules, OUTPUT, site, edit)
    input_refusals: list[Refusal] = []
    if done is None:
        if mutated(site.source):  # the layer after it would read the changed tensor instead
            input_refusals = [Refusal("its input is changed in place afterwards, so nothing can read it instead")]
        else:
            done, input_refusals = _apply_first(rules, INPUT, site, edit)
    if done is not None:
        entry, found = done
        return entry, _layer_calls(found)
    refusals = [
        *(output_refusals or [Refusal(describe_source(site.source))]),
        *(input_refusals or [_input_side_default(site)]),
    ]
    category = next((r.category for r in refusals if r.category), None)
    return kept_entry(site, "; ".join(r.reason for r in refusals), category), set()


def _layer_calls(found: object) -> set[fx.Node]:
    """The weight-layer calls a rule's match folds into."""
    layers = getattr(found, "layers", None) or [getattr(found, "layer", None)]
    return {layer.node for layer in layers if layer is not None}


def fold_program(
    program: ExportedProgram,
    types: Mapping[str, str] | None = None,
    skip: Mapping[str, str] | None = None,
    rules: RuleSet | None = None,
) -> FoldPass:
    """Fold every foldable batch-norm of ``program`` by rewriting its graph, in place.

    Folded weights are new stored tensors, so a layer used at several call sites keeps its
    original weights at the others, and the user's module (whose tensors the program shares)
    is never modified. ``types`` (module path -> class name) names the layers when the graph
    does not record its modules (e.g. converted TorchScript). ``skip`` (node name -> reason)
    names rewrites not to apply; ``rules`` the rules to apply (every registered rule by default).
    Returns the report of every batch-norm, the rewrites applied and the store (its new tensors
    still float64 until finalized).
    """
    rules = rules or select()
    store = TensorStore(program)
    edit = GraphEdit(store)
    drop_no_ops(store.graph)
    constants = store_constant_batchnorms(edit)
    store_computed_parameters(edit)
    order = {node: i for i, node in enumerate(store.graph.nodes)}
    batchnorms = [s for s in (batchnorm_site(n, store) for n in list(store.graph.nodes)) if s is not None]
    affines = affine_sites(store.graph, store)
    edit.affine_maps = {site.node: site for site in affines}
    sites: list[Site] = sorted([*batchnorms, *affines], key=lambda s: order[s.node])
    names = [s.name for s in sites]
    for i, site in enumerate(sites):
        if site.kind == "batch_norm" and "Norm" in (types or {}).get(site.name, ""):
            site.kind = types[site.name]
        if names.count(site.name) > 1:
            site.name = f"{site.name} (call {names[: i + 1].count(site.name)})"
        if isinstance(site, BatchNormSite) and not site.uses_batch_stats:
            check_statistics(store, site)
    folded = FoldPass(FoldReport(), store)
    entries: list[BatchNormEntry] = []
    into: list[set[fx.Node]] = []
    for site in sites:
        name = site.node.name
        entry, layers = fold_site(site, edit, rules, skip)
        entries.append(entry)
        into.append(layers)
        if entry.status != KEPT:
            folded.applied.append(name)
    while True:  # a merged block can give a kept batch-norm its conv: bn(conv_a(x) + conv_b(x) + x)
        kept = {site.node: i for i, (site, entry) in enumerate(zip(sites, entries)) if entry.status == KEPT}
        if not _merge_blocks(edit, rules, entries, kept, into, skip or {}, folded):
            break
        for i, site in enumerate(sites):
            if site.node in kept and entries[i].status == KEPT and not site.node._erased:
                name = site.node.name
                entries[i], into[i] = fold_site(site, edit, rules, skip)
                if entries[i].status != KEPT:
                    folded.applied.append(name)
    store.drop_unused()
    store.own_changed_state()
    store.graph.lint()
    program.graph_module.recompile()
    folded.report.entries = constants + entries + _in_branches(store)
    return folded


def _in_branches(store: TensorStore) -> list[BatchNormEntry]:
    """Batch-norms inside control-flow branches (``torch.cond``, ``torch.map``): kept, named."""
    entries = []
    for path, sub in store.program.graph_module.named_modules():
        if not path or not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            site = batchnorm_site(node)
            if site is not None:
                site.num_channels = site.channels(store)
                reason = "it is inside a control-flow branch (torch.cond, torch.map), which bnfold does not rewrite"
                entries.append(kept_entry(site, reason, "inside a control-flow branch"))
    return entries


def _merge_blocks(
    edit: GraphEdit,
    rules: RuleSet,
    entries: list[BatchNormEntry],
    kept: dict[object, int],
    into: list[set[fx.Node]],
    skip: Mapping[str, str],
    folded: FoldPass,
) -> bool:
    """Apply every ``BLOCK`` rule to each of its candidate nodes (except those ``skip`` names),
    updating the report entries of the blocks' batch-norms; returns whether any block was merged."""
    merged = False
    for rule in rules.of(BLOCK):
        for root in rule.candidates(edit.graph):
            if root._erased:  # an earlier merge removed it
                continue
            found = rule.match(root, edit)
            if found is not None and not isinstance(found, Refusal) and root.name in skip:
                folded.undone_merges.append(f"the branches merged into {found.into}")
                found = BlockRefusal(skip[root.name], PROOF_CATEGORY, found.batchnorms)
            if isinstance(found, Refusal):
                for node in getattr(found, "batchnorms", ()):
                    if node in kept:
                        entries[kept[node]] = replace(entries[kept[node]], reason=found.reason, category=found.category)
            elif found is not None:
                folded.applied.append(root.name)
                shared = rule.rewrite(found, edit)
                rule.report(found, entries, kept, into, shared)
                merged = True
    return merged
