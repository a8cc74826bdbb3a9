"""Fold rules: one module per pattern in this package, each registering itself (after onnxslim's
``register_fusion_pattern`` and onnxscript's rewrite rules, whose refused matches return a reason):

- ``match(site, edit)`` returns ``None`` when the pattern does not apply to the site at all, a
  :class:`Refusal` (reason and category) when it applies but folding would be wrong, or the
  rule's own match object when the rewrite is exact;
- ``rewrite(match, edit)`` applies it and returns the report entry.

Each module's docstring gives its algebra (see also :mod:`bnfold.folding.math`) and its last line
registers it: ``register(Rule(name, side, priority, match, rewrite))``. The side says where the
rule looks from a batch-norm or affine map: ``OUTPUT`` (it reads a weight layer), ``INPUT`` (it
feeds a weight layer or another map), or ``BLOCK`` (the rule matches an Add of parallel branches,
after the sites, and ``rewrite`` returns whether the weights it set were shared). The driver
tries every rule of a side in priority order (lower first) and applies the first match; a refusal
never stops a later rule from folding, and a site no rule folds keeps every refusal's reason.
Adding a pattern is adding a module here and a test module in ``tests/folding/rules/``: nothing
else names a rule.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx

from ...errors import Param, UsageError

OUTPUT, INPUT, BLOCK = "output", "input", "block"


@dataclass(frozen=True)
class Refusal:
    """Why a rule that applies to a batch-norm cannot fold it; ``category`` groups reasons in
    the report (``None``: derived from the batch-norm's input)."""

    reason: str
    category: str | None = None


@dataclass(frozen=True)
class BlockRefusal(Refusal):
    """A ``BLOCK`` rule's refusal, which applies to every batch-norm branch of the block."""

    batchnorms: tuple[fx.Node, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One fold rule: its name (for ``rules=``/``skip_rules=``), side, priority and functions.
    ``BLOCK`` rules also say which nodes to match (``candidates``) and how a merge changes the
    report entries of the batch-norms inside the block (``report``)."""

    name: str
    side: str
    priority: int
    match: Callable[[Any, Any], Any]
    rewrite: Callable[[Any, Any], Any]
    candidates: Callable[[fx.Graph], list[fx.Node]] | None = None
    report: Callable[..., None] | None = None


_REGISTRY: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry (each rule module calls this once, at import)."""
    if rule.side not in (OUTPUT, INPUT, BLOCK):
        raise ValueError(f"rule {rule.name!r}: side must be {OUTPUT!r}, {INPUT!r} or {BLOCK!r}")
    if rule.name in _REGISTRY and _REGISTRY[rule.name] is not rule:
        raise ValueError(f"two fold rules are named {rule.name!r}")
    _REGISTRY[rule.name] = rule
    return rule


def all_rules() -> list[Rule]:
    """Every rule of this package, by side and priority (importing the modules registers them)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(_REGISTRY.values(), key=lambda r: (r.side, r.priority, r.name))


@dataclass(frozen=True)
class RuleSet:
    """The rules a fold applies."""

    rules: tuple[Rule, ...]

    def of(self, side: str) -> list[Rule]:
        """This set's rules of ``side``, in priority order."""
        return [rule for rule in self.rules if rule.side == side]


def select(rules: Iterable[str] | None = None, skip_rules: Iterable[str] | None = None) -> RuleSet:
    """The registered rules named in ``rules`` (all when ``None``) less those in ``skip_rules``;
    an unknown name is a UsageError that lists the rules."""
    known = all_rules()
    names = {rule.name for rule in known}
    chosen, skipped = (None if rules is None else set(rules)), set(skip_rules or ())
    for parameter, given in (("rules", chosen or set()), ("skip_rules", skipped)):
        unknown = sorted(given - names)
        if unknown:
            raise UsageError(
                Param(parameter),
                f": unknown fold rule(s) {', '.join(unknown)}; the rules are {', '.join(sorted(names))}",
            )
    return RuleSet(tuple(r for r in known if (chosen is None or r.name in chosen) and r.name not in skipped))
