"""The rule registry (bnfold.folding.rules): every rule module registers itself; the driver tries
every rule of a side, so a refusal never hides a later rule's fold, and a batch-norm no rule
folds keeps every refusal's reason; rule sets are chosen by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fold_checks import assert_fold_exact, kept_reason, with_statistics
from helpers import random_input
from torch import nn

from bnfold import UsageError
from bnfold.folding import rules as registry
from bnfold.folding.rules import INPUT, OUTPUT, Refusal, Rule


def test_every_rule_module_registers_a_rule_with_a_unique_name():
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(registry.__path__)}
    rules = registry.all_rules()
    assert len({r.name for r in rules}) == len(rules)
    assert {r.match.__module__.rsplit(".", 1)[1] for r in rules} == modules


def test_every_rule_is_tested_alone_by_its_own_test_module():
    """Each rule has a test module whose RULES apply it alone (or beside the rule it builds on or
    mirrors: the block rule after conv_bn, through_in beside through_out), so its tests see no
    other rule's fold."""
    applied = {}
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["RULES"]:
                applied[path.stem] = set(ast.literal_eval(node.value))
    for rule in registry.all_rules():
        assert any(rule.name in names and len(names) <= 2 for names in applied.values()), rule.name


@pytest.fixture
def refusing_rule(monkeypatch):
    """A rule of the highest priority on both sides that refuses every site."""
    refuse = lambda site, edit: Refusal("the test rule refuses everything")
    for side in (OUTPUT, INPUT):
        rule = Rule(f"refuse_{side}", side, -1, refuse, lambda m, e: None)
        monkeypatch.setitem(registry._REGISTRY, rule.name, rule)


def test_a_refusal_never_hides_a_later_rules_fold(refusing_rule):
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert_fold_exact(model, random_input(2, 3, 5, 5), ["folded"])


def test_a_batchnorm_no_rule_folds_keeps_every_refusals_reason(refusing_rule):
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()))
    reason = kept_reason(assert_fold_exact(model, random_input(2, 3, 5, 5), ["kept"]))
    assert reason.count("the test rule refuses everything") == 2, reason


def test_rules_are_chosen_by_name_and_an_unknown_name_lists_them():
    assert [r.name for r in registry.select(["conv_bn", "bn_conv"]).rules] == ["bn_conv", "conv_bn"]
    assert "conv_bn" not in [r.name for r in registry.select(skip_rules=["conv_bn"]).rules]
    with pytest.raises(UsageError, match=r"`skip_rules`: unknown fold rule\(s\) nope; the rules are .*conv_bn"):
        registry.select(skip_rules=["nope"])
