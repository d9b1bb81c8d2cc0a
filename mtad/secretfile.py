"""Private files mtad keeps its secrets in (the admin token, the VERP key): made 0600, read safely.

A secret file is created with no moment in which it exists with wider permissions or half
written: the bytes go to a private temporary file (O_EXCL, mode 0600, fsync) that is then
linked into place, so a concurrent reader sees either no file or the whole secret, and two
processes creating it at once agree on one. Reading refuses symbolic links, anything that is
not a regular file, and files that group or others can read, rather than trusting them.
No asyncio and no aiohttp here: mtactl imports this.

Trust: the directory belongs to the mtad user, but the file may have been tampered with;
every such case is a SecretFileError whose message names the file and says what to do.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

MAX_SECRET = 4096


class SecretFileError(Exception):
    """A secret file cannot be read or created; the message names it and says why."""


def ensure(path: str, make: bytes, what: str) -> bytes:
    """The contents of `path`, created with `make` first when it does not exist.
    `what` names the file in errors ("admin token", "VERP key")."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if not os.path.lexists(path):
        create(path, make, what)
    return read(path, what)


def read(path: str, what: str) -> bytes:
    """The contents of the private file `path` (at most MAX_SECRET bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} {path}: {reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise SecretFileError(f"{what} {path} is readable by group or others "
                                  f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it or remove it")
        return os.read(fd, MAX_SECRET)
    finally:
        os.close(fd)


def create(path: str, data: bytes, what: str) -> None:
    """Write `data` to a new private file at `path`; if another process made it first, keep theirs."""
    temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise SecretFileError(f"cannot create {what} {path}: {reason(exc)}") from None
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first; read theirs
    except OSError as exc:
        raise SecretFileError(f"cannot create {what} {path}: {reason(exc)}") from None
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def reason(exc: OSError) -> str:
    """An OSError as a few lowercase words (no traceback text)."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link"
    return (exc.strerror or str(exc)).lower()
