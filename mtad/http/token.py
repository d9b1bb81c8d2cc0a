"""The admin token: a secret in `<spool_dir>/admin.token` that mtad creates and mtactl reads.

Whoever can read the file controls the queue, so it is created mode 0600 with no moment in which
it exists with wider permissions or half written, and a file that group or others can read is
refused rather than trusted. No aiohttp here: mtactl imports this module.

Trust: the spool directory belongs to the mtad user; the file may have been tampered with
(wrong mode, a symlink, empty), and every such case is an error with a clear message.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

TOKEN_FILE = "admin.token"


class AdminTokenError(Exception):
    """The admin token cannot be read or created; the message says why and names the file."""


def token_path(spool_dir: str) -> str:
    return os.path.join(spool_dir, TOKEN_FILE)


def read_admin_token(spool_dir: str) -> str:
    """The token in `<spool_dir>/admin.token`; AdminTokenError if missing, unsafe or empty."""
    path = token_path(spool_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AdminTokenError(f"cannot read admin token {path}: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdminTokenError(f"admin token {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AdminTokenError(
                f"admin token {path} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it or remove it"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = data.decode("ascii", "replace").strip()
    if not token:
        raise AdminTokenError(f"admin token {path} is empty; remove it and restart mtad")
    return token


def ensure_admin_token(spool_dir: str) -> str:
    """Read the admin token, creating it (0600, 256 random bits) when there is none.

    The new token is written to a private temporary file created O_EXCL with mode 0600 and
    then linked into place, so a concurrent reader sees either no file or the whole token.
    """
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    path = token_path(spool_dir)
    if not os.path.lexists(path):
        _create(path)
    return read_admin_token(spool_dir)


def _create(path: str) -> None:
    temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise AdminTokenError(f"cannot create admin token {path}: {_reason(exc)}") from None
    try:
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first; read theirs
    except OSError as exc:
        raise AdminTokenError(f"cannot create admin token {path}: {_reason(exc)}") from None
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link"
    return (exc.strerror or str(exc)).lower()
