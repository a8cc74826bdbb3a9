"""How the CLI names a library parameter: by the flag of the command's own option that sets it.

Library errors name parameters as :class:`~bnfold.errors.Param` parts of their message
(``UsageError(Param("rtol"), " must be non-negative")``). Each command's options say which
parameter they set: by default the one of their own name (``--rtol`` sets ``rtol``), else the one
declared with :class:`LibraryOption` / :class:`LibraryArgument` (``--no-verify`` sets
``verify=False``). :func:`cli_message` writes an error with those flags, so the library never
names a flag, the CLI never re-words the library's checks, and an option's flag is declared only
where the option is.
"""

from __future__ import annotations

from typing import Any

import click

from bnfold.errors import BnfoldError, Param


class LibraryOption(click.Option):
    """A click option that sets the library parameter ``parameter`` (default: the option's own
    name); a flag sets it to ``setting`` (``--no-verify``: ``parameter="verify", setting=False``)."""

    def __init__(self, *args: Any, parameter: str | None = None, setting: Any = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parameter = parameter or self.name
        self.setting = setting


class LibraryArgument(click.Argument):
    """A click argument that sets the library parameter ``parameter`` (``INPUTS`` sets ``data``)."""

    def __init__(self, *args: Any, parameter: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parameter = parameter or self.name


def flag_for(param: Param, command: click.Command) -> str | None:
    """How ``command``'s user sets ``param``: a flag (``--rtol``), a flag and value
    (``--device cuda``), an argument (``INPUTS``), or ``None`` when no option of it does."""
    for option in command.params:
        if getattr(option, "parameter", option.name) != param.name:
            continue
        if isinstance(option, click.Argument):
            return option.human_readable_name
        flag = max(option.opts, key=len)
        if not param.has_value:
            return flag
        if option.is_flag:
            if param.value == getattr(option, "setting", True):
                return flag
            continue
        return f"{flag} {param.value}"
    return None


def cli_message(error: BnfoldError, command: click.Command) -> str:
    """``error``'s message with each parameter written as ``command``'s flag that sets it
    (the library's spelling where none does)."""
    return error.render(lambda param: flag_for(param, command))
