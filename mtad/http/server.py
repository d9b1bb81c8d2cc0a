"""Serving an aiohttp app on host:port or on a unix socket: start, report the address, stop.

A unix socket is bound under a temporary name, given mode 0600 and only then renamed into place
and set listening, so there is no moment in which anyone but the mtad user can connect to it. A
stale socket file left by a crashed mtad is replaced; a live one (something answers) is an error.
Access logging is off: operator actions are logged by the apps, not per request.

Trust: the address comes from the operator's config.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat

from aiohttp import web

from mtad.config import endpoints

# How long stop() lets running requests (a long queue listing) finish before closing them.
SHUTDOWN_TIMEOUT = 5.0


class HttpServerError(Exception):
    """The address is malformed or cannot be bound; the message names it."""


def parse_address(address: str) -> tuple[str, int] | str:
    """`host:port` or `[v6]:port` as (host, port); an absolute path (unix socket) as itself.

    The same parsing `mtad --check` applied (mtad.config.endpoints), so a checked config binds.
    """
    try:
        if endpoints.is_unix_path(address):
            return endpoints.check_unix_path(address)
        host, port = endpoints.parse_hostport(address)
    except ValueError as exc:
        raise HttpServerError(f"{address}: {exc}") from None
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpServer:
    """One aiohttp app on one address: `await start(app, address)`, `bound()`, `await stop()`."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._bound = ""
        self._socket_inode: tuple[int, int] | None = None

    async def start(self, app: web.Application, address: str) -> None:
        if self._runner is not None:
            raise RuntimeError("HttpServer already started")
        where = parse_address(address)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            if isinstance(where, str):
                sock = _bind_unix(where)
                info = os.stat(where)
                self._socket_inode = (info.st_dev, info.st_ino)
                site: web.BaseSite = web.SockSite(runner, sock)
                self._bound = where
            else:
                host, port = where
                site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise HttpServerError(f"cannot listen on {address}: {exc.strerror}") from None
            if not isinstance(where, str):
                bound_host, bound_port = runner.addresses[0][:2]
                self._bound = format_address(bound_host, bound_port)
        except BaseException:
            await runner.cleanup()
            self._remove_socket()
            raise
        self._runner = runner

    def bound(self) -> str:
        """The address actually listened on (the real port when the config said port 0)."""
        if not self._bound:
            raise RuntimeError("HttpServer not started")
        return self._bound

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._remove_socket()

    def _remove_socket(self) -> None:
        # Only our own socket: another mtad may have replaced it since.
        if self._socket_inode is None:
            return
        path, self._socket_inode, expected = self._bound, None, self._socket_inode
        try:
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == expected:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _bind_unix(path: str) -> socket.socket:
    _remove_stale_socket(path)
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        try:
            os.chmod(temporary, 0o600)
            os.rename(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HttpServerError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise HttpServerError(f"cannot listen on {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left by a process that is gone
        return
    except OSError:
        return  # not ours to judge; bind will report it
    finally:
        probe.close()
    raise HttpServerError(f"cannot listen on {path}: another process is listening there")
