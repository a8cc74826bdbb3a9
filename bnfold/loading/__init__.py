"""Loading a trained model file into an eval-mode module, safely.

- :mod:`.detect`: the format, detected from the content, and :func:`load_model`, which sends
  each format to its reader;
- :mod:`.pickles` and :mod:`.pickle_scan`: ``torch.save`` files read with ``weights_only`` and a
  short allow-list, and the globals a refused pickle would import;
- :mod:`.archive`: ``torch.export`` archives checked for code before torch reads them;
- :mod:`.state_dict` and :mod:`.usercode`: a state_dict applied to the ``arch`` factory's module;
- :mod:`.loaded`: :class:`LoadedModel`, what a file records of its inputs; :func:`parse_shape`
  (from :mod:`bnfold.shapes`).
"""

from ..shapes import Shape, parse_shape
from .archive import export_archive_problems
from .detect import STATE_DICT_KEYS, TORCHSCRIPT_META_FILE, load_model, sniff_format
from .loaded import (
    EXPORTED_PROGRAM,
    INPUT_SHAPE_KEYS,
    PICKLED_MODULE,
    STATE_DICT,
    TORCHSCRIPT,
    LoadedModel,
)
from .pickle_scan import COMPUTED_GLOBAL, pickle_globals
from .pickles import safe_globals, unsafe_globals
from .state_dict import WRAPPER_PREFIXES, apply_state_dict
from .usercode import resolve_factory

__all__ = [
    "COMPUTED_GLOBAL",
    "EXPORTED_PROGRAM",
    "INPUT_SHAPE_KEYS",
    "PICKLED_MODULE",
    "STATE_DICT",
    "STATE_DICT_KEYS",
    "TORCHSCRIPT",
    "TORCHSCRIPT_META_FILE",
    "WRAPPER_PREFIXES",
    "LoadedModel",
    "Shape",
    "apply_state_dict",
    "export_archive_problems",
    "load_model",
    "parse_shape",
    "pickle_globals",
    "resolve_factory",
    "safe_globals",
    "sniff_format",
    "unsafe_globals",
]
