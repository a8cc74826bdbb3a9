"""``bnfold`` console script: the command group, its error handling and its commands.

Errors a user can cause become one line on stderr and the exit code of their class
(see ``bnfold.errors``); ``bnfold --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from bnfold.cli.commands.bench import bench_command
from bnfold.cli.commands.export import export_command
from bnfold.cli.commands.inspect import inspect_command
from bnfold.cli.commands.predict import predict_command
from bnfold.cli.commands.serve import serve_command
from bnfold.cli.commands.verify import verify_command
from bnfold.cli.flags import cli_message

from bnfold import __version__
from bnfold.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, BnfoldError, VerificationError, first_line


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bnfold errors into one stderr line (flags, not parameters: see ``bnfold.cli.flags``)
    and an exit code; tracebacks only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().obj.get("debug", False)
        try:
            return command(*args, **kwargs)
        except BnfoldError as exc:
            if debug:
                raise
            report = getattr(exc, "report", None)
            if isinstance(exc, VerificationError) and report is not None:
                click.echo(str(report))
            _fail(cli_message(exc, click.get_current_context().command), exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except Exception as exc:  # a bug in bnfold or a library: still one line, unless --debug
            if debug:
                raise
            _fail(
                f"internal error: {first_line(exc, with_type=True)} (re-run as `bnfold --debug ...` for the traceback)",
                EXIT_INTERNAL,
            )

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fold batch-norm into a trained PyTorch CNN, export it to ONNX and verify it.

    Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 unreadable, unsafe or
    unsupported model, 4 internal error, 5 output could not be written, 130 interrupted.
    """
    ctx.ensure_object(dict)["debug"] = debug


def _register(*commands: click.Command) -> None:
    """Add ``commands`` to the group, each run under :func:`handle_errors`."""
    for command in commands:
        command.callback = handle_errors(command.callback)
        main.add_command(command)


_register(export_command, inspect_command, verify_command, bench_command, predict_command, serve_command)


if __name__ == "__main__":  # pragma: no cover
    main()
