"""A scripted SMTP peer for tests: a real server on 127.0.0.1:0 that can misbehave on cue.

The server runs its own event loop in a thread, so sync tests (smtplib, subprocesses) and
async tests (whatever loop they run) use it the same way: `with Peer(...) as peer:` or
`async with Peer(...) as peer:`. It records every connection (client address, HELO, TLS, each
command with the number of the read that brought it, so tests can see pipelining) and every
transaction that reached the final dot (sender, parameters, accepted recipients, the data
un-stuffed: the exact bytes the client meant, its final CRLF.CRLF removed).

Behaviour per recipient, by local part:
    tempfail-...            RCPT 450 4.2.0
    550-...                 RCPT 550 5.1.1 user unknown
    421-...                 RCPT 421 4.3.2, then the server closes the connection
    slow-...                RCPT 250 after `slow` seconds
    disconnect-in-data-...  RCPT 250; the server drops the connection after the first data line
    552-...                 RCPT 250; the final dot gets 552 5.2.2 mailbox full
    anything else           250
Server-level switches are Peer's keyword arguments (`scripted=False`: 250 to every recipient;
`max_recipients=N`: 452 4.5.3 to each RCPT past the Nth of a transaction); `closed_port()` gives a port where nothing
listens (connection refused) and `tls_files()` a test CA and a server certificate for
localhost / mx.peer.test / 127.0.0.1 / ::1, made once per process in a temporary directory.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cryptography import x509
from support import ThreadedServer, TlsFiles, make_test_tls


@dataclass
class Connection:
    id: int
    client: tuple[str, int]
    helo: str = ""
    tls: bool = False
    commands: list[tuple[int, str]] = field(default_factory=list)
    """(number of the read that completed the line, command line) for every command."""


@dataclass
class Transaction:
    connection: int
    client: tuple[str, int]
    helo: str
    tls: bool
    sender: str
    mail_params: list[str]
    recipients: list[str]
    """Recipients answered 250."""
    rcpt_params: dict[str, list[str]]
    data: bytes
    reply: int
    """The code given to the final dot."""


_tls_lock = threading.Lock()
_tls_cache: dict[str, TlsFiles] = {}


def tls_files() -> TlsFiles:
    """A self-signed test CA and a server certificate it signed (cached for the process)."""
    with _tls_lock:
        if "main" not in _tls_cache:
            directory = Path(tempfile.mkdtemp(prefix="mtad-peer-tls-"))
            atexit.register(shutil.rmtree, directory, True)
            _tls_cache["main"] = _make_tls(directory)
        return _tls_cache["main"]


def _make_tls(directory: Path) -> TlsFiles:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName("mx.peer.test"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    return make_test_tls(directory, ca_name="mtad test CA", server_name="mx.peer.test", names=names)


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on `host` where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Peer(ThreadedServer):
    """The scripted SMTP server; see the module docstring."""

    thread_name = "smtp-peer"

    def __init__(self, *, host: str = "127.0.0.1", greeting: int = 220, esmtp: bool = True,
                 pipelining: bool = True, starttls: bool = False, tls_broken: bool = False, size: int = 0,
                 eightbitmime: bool = True, smtputf8: bool = True, dsn: bool = True, drop: bool = False,
                 tarpit: bool = False, slow: float = 1.0, scripted: bool = True, max_recipients: int = 0,
                 name: str = "mx.peer.test", port: int = 0) -> None:
        self.host, self.greeting, self.esmtp, self.pipelining = host, greeting, esmtp, pipelining
        self.starttls, self.tls_broken, self.size = starttls, tls_broken, size
        self.eightbitmime, self.smtputf8, self.dsn = eightbitmime, smtputf8, dsn
        self.drop, self.tarpit, self.slow, self.name = drop, tarpit, slow, name
        self.scripted, self.max_recipients = scripted, max_recipients
        super().__init__()
        self.port = port
        """The port to listen on (0: any free one), then the one bound."""
        self.connections: list[Connection] = []
        self.transactions: list[Transaction] = []
        self._changed = threading.Condition()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tls: ssl.SSLContext | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self.starttls and not self.tls_broken:
            files = tls_files()
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(files.cert, files.key)
        return super().start()

    def kick(self, reply: str = "421 4.4.2 idle timeout, closing connection") -> None:
        """Send `reply` on every open connection and close it (a server ending idle sessions)."""
        async def kick_all() -> None:
            for writer in list(self._writers):
                writer.write(reply.encode() + b"\r\n")
                writer.close()
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(kick_all(), self._loop).result(5)

    async def _serve(self, ready: threading.Event) -> None:
        assert self._stopping is not None
        server = await asyncio.start_server(self._session, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await server.wait_closed()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # --- waiting for results -----------------------------------------------------------------

    def wait_transactions(self, count: int, timeout: float = 10) -> list[Transaction]:
        """Block until `count` transactions were recorded (AssertionError after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.transactions) >= count, timeout):
                raise AssertionError(f"{len(self.transactions)} of {count} transactions arrived")
        return self.transactions

    async def await_transactions(self, count: int, timeout: float = 10) -> list[Transaction]:
        deadline = time.monotonic() + timeout
        while len(self.transactions) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.transactions)} of {count} transactions arrived")
            await asyncio.sleep(0.01)
        return self.transactions

    def _record(self, transaction: Transaction) -> None:
        with self._changed:
            self.transactions.append(transaction)
            self._changed.notify_all()

    # --- one session -------------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peername = writer.get_extra_info("peername")
        conn = Connection(len(self.connections) + 1, (peername[0], peername[1]))
        self.connections.append(conn)
        try:
            await _Dialog(self, conn, reader, writer).run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (3.11's start_server logs a cancelled handler task as an error)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class _Dialog:
    """The server side of one connection."""

    def __init__(self, peer: Peer, conn: Connection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.peer, self.conn, self.reader, self.writer = peer, conn, reader, writer
        self.buffer = b""
        self.reads = 0
        self.reset()

    def reset(self) -> None:
        self.sender: str | None = None
        self.mail_params: list[str] = []
        self.recipients: list[str] = []
        self.rcpt_params: dict[str, list[str]] = {}

    async def line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = await self.reader.read(65536)
            if not chunk:
                return None
            self.reads += 1
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    async def reply(self, text: str) -> None:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()

    async def run(self) -> None:
        peer = self.peer
        if peer.drop:
            return
        if peer.tarpit:
            while await self.reader.read(4096):
                pass
            return
        if peer.greeting != 220:
            await self.reply(f"{peer.greeting} {peer.name} go away")
            if peer.greeting == 421:
                return
        else:
            await self.reply(f"220 {peer.name} ESMTP scripted peer")
        while (raw := await self.line()) is not None:
            command = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.conn.commands.append((self.reads, command))
            verb = command.split(" ", 1)[0].upper()
            if peer.greeting != 220 and verb != "QUIT":
                await self.reply("503 5.5.1 go away")
                continue
            if not await self.dispatch(verb, command):
                return

    async def dispatch(self, verb: str, command: str) -> bool:
        """Answer one command; False ends the session."""
        peer = self.peer
        arg = command[len(verb):].strip()
        if verb == "EHLO" and peer.esmtp:
            self.conn.helo = arg
            lines = [peer.name, "ENHANCEDSTATUSCODES"]
            lines += ["PIPELINING"] if peer.pipelining else []
            lines += [f"SIZE {peer.size}" if peer.size else "SIZE"]
            lines += ["8BITMIME"] if peer.eightbitmime else []
            lines += ["SMTPUTF8"] if peer.smtputf8 else []
            lines += ["DSN"] if peer.dsn else []
            lines += ["STARTTLS"] if peer.starttls and not self.conn.tls else []
            await self.reply("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}"
                                         for i, line in enumerate(lines)))
        elif verb == "HELO":
            self.conn.helo = arg
            await self.reply(f"250 {peer.name}")
        elif verb == "STARTTLS" and peer.starttls and not self.conn.tls:
            await self.reply("220 2.0.0 go ahead")
            if peer.tls_broken or peer._tls is None:
                self.writer.write(b"this is not a TLS handshake\r\n" * 8)
                await self.writer.drain()
                return False
            await self.writer.start_tls(peer._tls)
            self.conn.tls = True
            self.reset()
        elif verb == "MAIL":
            return await self.mail(arg)
        elif verb == "RCPT":
            return await self.rcpt(arg)
        elif verb == "DATA":
            return await self.data()
        elif verb == "RSET":
            self.reset()
            await self.reply("250 2.0.0 ok")
        elif verb == "NOOP":
            await self.reply("250 2.0.0 ok")
        elif verb == "QUIT":
            await self.reply("221 2.0.0 bye")
            return False
        else:
            await self.reply("502 5.5.1 command not implemented")
        return True

    async def mail(self, arg: str) -> bool:
        path, _, params = arg[6:].partition(">") if arg.upper().startswith("FROM:<") else ("", "", "")
        self.reset()
        self.sender, self.mail_params = path, params.split()
        sizes = [int(p[5:]) for p in self.mail_params if p.upper().startswith("SIZE=") and p[5:].isdigit()]
        if self.peer.size and sizes and sizes[0] > self.peer.size:
            self.sender = None
            await self.reply("552 5.3.4 message too big")
        else:
            await self.reply("250 2.1.0 sender ok")
        return True

    async def rcpt(self, arg: str) -> bool:
        if self.sender is None:
            await self.reply("503 5.5.1 need MAIL first")
            return True
        path, _, params = arg[4:].partition(">") if arg.upper().startswith("TO:<") else ("", "", "")
        local_part = path.rpartition("@")[0].lower() if self.peer.scripted else ""
        if self.peer.max_recipients and len(self.recipients) >= self.peer.max_recipients:
            await self.reply("452 4.5.3 too many recipients")
        elif local_part.startswith("tempfail-"):
            await self.reply("450 4.2.0 mailbox busy, try later")
        elif local_part.startswith("550-"):
            await self.reply("550 5.1.1 user unknown")
        elif local_part.startswith("421-"):
            await self.reply("421 4.3.2 service shutting down")
            return False
        else:
            if local_part.startswith("slow-"):
                await asyncio.sleep(self.peer.slow)
            self.recipients.append(path)
            self.rcpt_params[path] = params.split()
            await self.reply("250 2.1.5 recipient ok")
        return True

    async def data(self) -> bool:
        if self.sender is None or not self.recipients:
            await self.reply("554 5.5.1 no valid recipients")
            return True
        await self.reply("354 go ahead")
        lines: list[bytes] = []
        scripted = self.peer.scripted
        drop = scripted and any(r.lower().startswith("disconnect-in-data-") for r in self.recipients)
        while (raw := await self.line()) is not None:
            if raw == b".\r\n":
                break
            if drop:
                return False
            lines.append(raw[1:] if raw.startswith(b".") else raw)
        else:
            return False
        full = scripted and any(r.lower().startswith("552-") for r in self.recipients)
        code = 552 if full else 250
        self.peer._record(Transaction(self.conn.id, self.conn.client, self.conn.helo, self.conn.tls,
                                      self.sender, self.mail_params, self.recipients, self.rcpt_params,
                                      b"".join(lines), code))
        self.reset()
        await self.reply("552 5.2.2 mailbox full" if full else f"250 2.0.0 ok: queued as {len(self.peer.transactions)}")
        return True


SMTP_SINK = "/usr/sbin/smtp-sink"


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1 (250 to everything); `pipelining=False` starts it with -p."""

    def __init__(self, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return os.access(SMTP_SINK, os.X_OK)

    def __enter__(self) -> Self:
        self.port = closed_port()
        argv = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else []) + ([] if self.pipelining else ["-p"])
        self._proc = subprocess.Popen(argv + [f"127.0.0.1:{self.port}", "100"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.01)
        self.__exit__()
        raise RuntimeError("smtp-sink did not start")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
