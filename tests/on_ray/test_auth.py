"""Bearer tokens: read from a file, checked against a digest."""

from __future__ import annotations

import pytest

import bnfold
from bnfold.on_ray.auth import authorized, read_token, token_digest

TOKEN = "s3cret-token-0123456789"


def test_the_token_is_the_first_line_without_whitespace(tmp_path):
    file = tmp_path / "token"
    file.write_text(f"  {TOKEN}  \nsecond line\n")
    assert read_token(file) == TOKEN


@pytest.mark.parametrize("content", ["", "\n\n", "short\n"])
def test_an_empty_or_short_token_is_refused_naming_the_parameter(tmp_path, content):
    file = tmp_path / "token"
    file.write_text(content)
    with pytest.raises(bnfold.UsageError, match=r"`token_file` .*at least 16 characters"):
        read_token(file)


def test_a_missing_token_file_is_refused_without_its_content(tmp_path):
    with pytest.raises(bnfold.UsageError, match=r"`token_file` .*cannot read it \(FileNotFoundError\)"):
        read_token(tmp_path / "absent")


def test_only_the_right_bearer_token_is_authorized():
    digest = token_digest(TOKEN)
    assert TOKEN not in digest
    assert authorized(f"Bearer {TOKEN}", digest) and authorized(f"bearer {TOKEN}", digest)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        assert not authorized(header, digest), header


def test_without_a_token_everything_is_authorized():
    assert authorized(None, None) and authorized("Bearer anything", None)
