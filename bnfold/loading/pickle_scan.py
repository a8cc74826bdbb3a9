"""Which globals a pickle imports, read from its opcodes without unpickling it.

torch has a scanner of its own (``torch.serialization.get_unsafe_globals_in_checkpoint``), used
for zip-format checkpoints (see :func:`bnfold.loading.pickles.unsafe_globals`). It cannot replace
this one: it reads only a zip checkpoint's ``data.pkl`` (no legacy ``torch.save`` files, no bare
pickles, no other ``.pkl`` member of an archive) and it stops at the first opcode beyond those
``torch.save`` writes with protocol 2 (``STACK_GLOBAL``, ``MEMOIZE``, ``FRAME``, ...), which is
where a crafted pickle is free to go.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import re
from typing import IO, Any

# What is reported for a global whose name is not a literal in the pickle.
COMPUTED_GLOBAL = "<a global whose name is computed while unpickling>"

_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_GLOBAL_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _python3_name(module: str, attr: str) -> str:
    """``module.attr`` as Python 3 imports it (protocol 0-2 pickles may use Python 2 names)."""
    module, attr = _compat_pickle.NAME_MAPPING.get(
        (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
    )
    return f"{module}.{attr}"


def pickle_globals(stream: IO[bytes], max_pickles: int = 1) -> set[str]:
    """Every ``module.name`` the pickles at the start of ``stream`` import, found without unpickling.

    Reads up to ``max_pickles`` consecutive pickles (the legacy ``torch.save`` format is five) with
    :func:`pickletools.genops`, which parses the same opcodes as the unpickler; parsing stops
    quietly at the first malformed opcode, keeping what was found before it (an unpickler would
    have imported those before failing). ``STACK_GLOBAL`` operands are followed through the memo;
    one whose name is not a literal string, and ``EXT*`` extension codes, are reported as
    :data:`COMPUTED_GLOBAL`.
    """
    found: set[str] = set()
    for _ in range(max_pickles):
        memo: dict[Any, Any] = {}
        pushed: list[Any] = []  # what each opcode pushed: a str for string literals, else None
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    if _GLOBAL_NAME.fullmatch(module) and _GLOBAL_NAME.fullmatch(attr):
                        found.add(_python3_name(module, attr))
                elif name == "STACK_GLOBAL":
                    module, attr = pushed[-2:] if len(pushed) >= 2 else [None, None]
                    ok = isinstance(module, str) and isinstance(attr, str)
                    found.add(f"{module}.{attr}" if ok else COMPUTED_GLOBAL)
                elif name.startswith("EXT"):
                    found.add(COMPUTED_GLOBAL)
                if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if name in _STRING_OPCODES and isinstance(arg, str) else None)
        except Exception:  # malformed or exhausted: the rest is not pickle data
            break
    return found
