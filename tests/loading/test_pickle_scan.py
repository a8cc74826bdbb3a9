"""The opcode scan names the globals a pickle imports without unpickling it."""

from __future__ import annotations

import io
import pathlib
import pickle

import numpy as np
from hostile import RunsCommand

from bnfold.loading import COMPUTED_GLOBAL, pickle_globals


def test_pickle_scanner_follows_stack_globals_and_memo():
    data = pickle.dumps({"a": np.float64(1), "b": np.float64(2), "c": RunsCommand(pathlib.Path("x"))}, protocol=4)
    found = pickle_globals(io.BytesIO(data))
    assert {"posix.system", "numpy.dtype"} <= found and COMPUTED_GLOBAL not in found
    assert pickle_globals(io.BytesIO(b"\x80\x04\x8c\x02os\x8c\x06system\x93.")) == {"os.system"}
    via_memo = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93."  # BINGET both names back
    assert pickle_globals(io.BytesIO(via_memo)) == {"os.system"}
    # A global whose name is computed (here from two ints) cannot be named statically: flagged.
    assert pickle_globals(io.BytesIO(b"\x80\x04K\x01K\x02\x93.")) == {COMPUTED_GLOBAL}
    # Python 2 names of protocol 0-2 pickles are reported as Python 3 imports them.
    assert pickle_globals(io.BytesIO(b"c__builtin__\nset\n.")) == {"builtins.set"}


def test_several_pickles_in_a_row_are_read_up_to_the_limit():
    """The legacy torch.save format is several pickles back to back."""
    data = pickle.dumps(1, protocol=2) + pickle.dumps(RunsCommand(pathlib.Path("x")), protocol=2)
    assert pickle_globals(io.BytesIO(data)) == set()
    assert pickle_globals(io.BytesIO(data), max_pickles=2) == {"posix.system"}
