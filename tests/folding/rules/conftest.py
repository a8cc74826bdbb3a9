"""Each rule's tests apply that rule alone: a test module names its rules in ``RULES`` (a test
that needs more says so with ``@pytest.mark.rules(...)``), and the shared checks fold with only
those (see ``fold_checks.RULES``). A module without ``RULES`` (cross-cutting tests) uses all."""

from __future__ import annotations

import fold_checks
import pytest


@pytest.fixture(autouse=True)
def only_the_rules_under_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = request.node.get_closest_marker("rules")
    rules = marker.args if marker else getattr(request.module, "RULES", None)
    monkeypatch.setattr(fold_checks, "RULES", None if rules is None else tuple(rules))
