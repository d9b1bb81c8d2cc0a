"""The admin token: a secret in `<spool_dir>/admin.token` that mtad creates and mtactl reads.

Whoever can read the file controls the queue, so it is a private file (mtad.secretfile: created
0600 with no moment in which it is wider or half written; refused when group or others can read
it). No aiohttp here: mtactl imports this module.

Trust: the spool directory belongs to the mtad user; the file may have been tampered with
(wrong mode, a symlink, empty), and every such case is an error with a clear message.
"""

from __future__ import annotations

import os
import secrets

from mtad import secretfile
from mtad.secretfile import SecretFileError

TOKEN_FILE = "admin.token"


class AdminTokenError(SecretFileError):
    """The admin token cannot be read or created; the message says why and names the file."""


def token_path(spool_dir: str) -> str:
    return os.path.join(spool_dir, TOKEN_FILE)


def read_admin_token(spool_dir: str) -> str:
    """The token in `<spool_dir>/admin.token`; AdminTokenError if missing, unsafe or empty."""
    path = token_path(spool_dir)
    try:
        data = secretfile.read(path, "admin token")
    except SecretFileError as exc:
        raise AdminTokenError(str(exc)) from None
    token = data.decode("ascii", "replace").strip()
    if not token:
        raise AdminTokenError(f"admin token {path} is empty; remove it and restart mtad")
    return token


def ensure_admin_token(spool_dir: str) -> str:
    """Read the admin token, creating it (0600, 256 random bits) when there is none."""
    path = token_path(spool_dir)
    try:
        secretfile.ensure(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"), "admin token")
    except SecretFileError as exc:
        raise AdminTokenError(str(exc)) from None
    return read_admin_token(spool_dir)
