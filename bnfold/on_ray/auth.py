"""Bearer-token authentication for the model server.

The token is read from a file (never a command-line argument, which other users of the machine
can read in the process list) and only its SHA-256 digest travels to the replicas, so the token
itself is in no Ray object, log or dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from ..errors import Param, UsageError

MIN_TOKEN_CHARS = 16


def read_token(token_file: str | os.PathLike[str]) -> str:
    """The token in ``token_file`` (its first line, without surrounding whitespace); a
    :class:`UsageError` naming ``token_file`` if it is missing, unreadable, empty or too short."""
    file = Path(token_file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(Param("token_file"), f" {file}: cannot read it ({type(exc).__name__})") from exc
    token = text.strip().split("\n")[0].strip() if text.strip() else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise UsageError(
            Param("token_file"),
            f" {file}: the token on its first line must have at least {MIN_TOKEN_CHARS} "
            f"characters (it has {len(token)}); e.g. write the output of `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'` to it",
        )
    return token


def token_digest(token: str) -> str:
    """The hex SHA-256 digest of ``token``: what a replica keeps to check requests with."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def authorized(header: str | None, digest: str | None) -> bool:
    """Whether an ``Authorization`` header value carries the token whose digest is ``digest``
    (always, when there is no token); compared in constant time."""
    if digest is None:
        return True
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(token_digest(presented.strip()), digest)
