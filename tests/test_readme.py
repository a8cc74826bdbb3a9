"""The README's set-up commands are the ones CI runs, and its CLI reference matches the CLI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_two_setup_commands_export_a_sample_and_run_the_tests():
    export_cmd, test_cmd = readme_commands()
    assert "torch==2.13.0" in export_cmd and "bnfold export sample_models/" in export_cmd
    assert test_cmd.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_documented_exit_codes_match_the_code():
    from bnfold import errors

    for code in (
        errors.EXIT_OK,
        errors.EXIT_VERIFICATION_FAILED,
        errors.EXIT_USAGE,
        errors.EXIT_BAD_INPUT,
        errors.EXIT_INTERNAL,
        errors.EXIT_OUTPUT,
        errors.EXIT_INTERRUPTED,
    ):
        assert re.search(rf"^\| {code} \|", README, re.M), f"exit code {code} not documented"


def test_every_cli_option_is_in_the_readme():
    import click
    from bnfold.cli.main import main

    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                flag = max(param.opts, key=len)
                assert flag in README, f"bnfold {name} {flag} is not documented in the README"
