"""The README's set-up commands are the ones CI runs; the README stays a short user's guide whose
links resolve; docs/cli.md documents every option and exit code the CLI has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()
# The README is a user's guide; reference lives in docs/.
README_MAX_BYTES = 20_000


def readme_commands() -> list[str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_two_setup_commands_export_a_sample_and_run_the_tests():
    export_cmd, test_cmd = readme_commands()
    assert "torch==2.13.0" in export_cmd and "bnfold export sample_models/" in export_cmd
    assert test_cmd.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_is_a_short_guide_whose_links_resolve():
    assert len(README.encode()) <= README_MAX_BYTES
    for page in ROOT.glob("docs/*.md"):
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text):
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to missing {target}"
    for target in re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).is_file(), f"README links to missing {target}"
    assert {p.name for p in ROOT.glob("docs/*.md")} <= set(re.findall(r"docs/([\w-]+\.md)", README))


@pytest.mark.parametrize("text", [README, CLI_DOC], ids=["README", "docs/cli.md"])
def test_documented_exit_codes_match_the_code(text):
    from bnfold import errors

    for code in (
        errors.EXIT_OK,
        errors.EXIT_VERIFICATION_FAILED,
        errors.EXIT_USAGE,
        errors.EXIT_BAD_INPUT,
        errors.EXIT_INTERNAL,
        errors.EXIT_OUTPUT,
        errors.EXIT_ROWS_FAILED,
        errors.EXIT_INTERRUPTED,
    ):
        assert re.search(rf"^\| {code} \|", text, re.M), f"exit code {code} not documented"


def test_every_cli_option_is_in_the_cli_reference():
    import click
    from bnfold.cli.main import main

    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                flag = max(param.opts, key=len)
                assert flag in CLI_DOC, f"bnfold {name} {flag} is not documented in docs/cli.md"
