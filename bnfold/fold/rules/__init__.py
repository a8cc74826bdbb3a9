"""Fold rules, one module per pattern, each the same shape (after onnxscript's rewrite rules):

- ``match(site, edit)`` returns ``None`` when the pattern does not apply to the batch-norm
  ``site`` at all, a :class:`Refusal` (reason and category) when it applies but folding would
  be wrong, or the module's ``Match`` when the rewrite is exact;
- ``rewrite(match, edit)`` applies it and returns the report entry.

Each module's docstring gives its algebra (see also :mod:`bnfold.fold.math`). The driver tries
the output-side rules (the batch-norm reads a weight layer) and then the input-side rules (the
batch-norm feeds one), in the order listed here. Adding a pattern is adding a module here and a
test module in ``tests/fold/rules/``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a rule that applies to a batch-norm cannot fold it; ``category`` groups reasons in
    the report (``None``: derived from the batch-norm's input)."""

    reason: str
    category: str | None = None
