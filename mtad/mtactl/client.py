"""mtactl's side of the admin API: find the daemon from the config, authenticate, call, decode.

A small synchronous HTTP/1.1 client over the stdlib (http.client), on TCP or a unix socket,
because mtactl must start fast (no aiohttp, no event loop). Every failure becomes one
ClientError whose text is the line mtactl prints after "mtactl: " before exiting 1.

Trust: the daemon's answers are decoded into the adminapi Structs and checked as they are.
"""

from __future__ import annotations

import errno
import http.client
import socket
from collections.abc import Iterator
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import msgspec

from mtad import config
from mtad.config.schema import Config
from mtad.http import adminapi
from mtad.http.token import AdminTokenError, read_admin_token

T = TypeVar("T")

DEFAULT_CONFIG = "/etc/mtad/mtad.toml"
TIMEOUT = 60.0
_CHUNK = 64 * 1024


class ClientError(Exception):
    """A failed operation; str() is the line printed after "mtactl: "."""


def load_config(path: str) -> Config:
    """The daemon's config, so mtactl finds its admin address and spool directory."""
    try:
        return config.load_config(path)
    except config.ConfigError as exc:
        # One line: the loader's first problem, naming the file or the dotted key.
        problem = exc.problems[0] if exc.problems else "invalid"
        raise ClientError(problem if problem.startswith(path) else f"{path}: {problem}") from None


def open_client(config_path: str, *, timeout: float = TIMEOUT) -> AdminClient:
    """A client for the daemon that `config_path` configures, holding its admin token.
    `timeout`: how long one call may wait for the daemon's answer."""
    settings = load_config(config_path)
    try:
        token = read_admin_token(settings.server.spool_dir)
    except AdminTokenError as exc:
        raise ClientError(str(exc)) from None
    return AdminClient(settings.http.admin_address, token, timeout)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Calls on mtad's admin API at `address` (host:port, [v6]:port or a unix socket path)."""

    def __init__(self, address: str, token: str, timeout: float = TIMEOUT) -> None:
        self.address = address
        self._token = token
        self._timeout = timeout

    def get(self, path: str, type_: type[T], *, queue_id: str = "") -> T:
        return self._decode(self._call("GET", path, queue_id), type_)

    def post(self, path: str, type_: type[T], *, queue_id: str = "") -> T:
        return self._decode(self._call("POST", path, queue_id), type_)

    def delete(self, path: str, type_: type[T], *, queue_id: str = "") -> T:
        return self._decode(self._call("DELETE", path, queue_id), type_)

    def send(self, method: str, path: str, type_: type[T], body: object = None) -> T:
        """Any method, with `body` (a Struct, dict or list) sent as JSON when given."""
        data = None if body is None else msgspec.json.encode(body)
        return self._decode(self._call(method, path, body=data), type_)

    def lines(self, path: str, type_: type[T]) -> Iterator[T]:
        """Decode a JSON-lines answer one line at a time, as it arrives."""
        decoder = msgspec.json.Decoder(type_)
        response = self._call("GET", path)
        try:
            for line in response:
                if line.strip():
                    yield self._checked(decoder.decode, line)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            response.close()

    def copy(self, path: str, out: BinaryIO, *, queue_id: str = "") -> None:
        """Write a binary answer to `out` as it arrives."""
        response = self._call("GET", path, queue_id)
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            raise self._unreachable(exc) from None
        finally:
            response.close()

    def _call(self, method: str, path: str, queue_id: str = "", *,
              body: bytes | None = None) -> http.client.HTTPResponse:
        connection = self._connection()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._unreachable(exc) from None
        if response.status >= 400:
            body = response.read()
            connection.close()
            raise _answer_error(response.status, body, queue_id)
        return response

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith("/"):
            return _UnixConnection(self.address, self._timeout)
        host, _, port = self.address.rpartition(":")
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self._timeout)

    def _decode(self, response: http.client.HTTPResponse, type_: type[T]) -> T:
        try:
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            response.close()
        return self._checked(msgspec.json.Decoder(type_).decode, body)

    def _checked(self, decode: Any, data: bytes) -> Any:
        try:
            return decode(data)
        except msgspec.DecodeError:
            raise ClientError(f"unexpected answer from mtad at {self.address}") from None

    def _unreachable(self, exc: Exception) -> ClientError:
        return ClientError(f"cannot reach mtad at {self.address}: {_network_reason(exc)}")


def queue_path(queue_id: str, suffix: str = "") -> str:
    return f"{adminapi.QUEUE}/{quote(queue_id, safe='')}{suffix}"


def _answer_error(status: int, body: bytes, queue_id: str) -> ClientError:
    try:
        error = msgspec.json.decode(body, type=adminapi.ErrorBody).error
    except msgspec.DecodeError:
        error = adminapi.ErrorDetail("", "")
    if status == 401:
        return ClientError("admin token rejected")
    if error.code == "no_such_message":
        return ClientError(f"no such message: {queue_id}")
    message = error.message or http.client.responses.get(status, "error")
    return ClientError(f"mtad answered {status}: {message}")


def _network_reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return "no such socket"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionError)):
        return "connection closed"
    return "protocol error"
