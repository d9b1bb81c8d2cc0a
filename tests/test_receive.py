"""The SMTP receiver end to end: real smtplib and raw-socket sessions against a Receiver on 127.0.0.1:0.

Also holds the helpers the other receive test files import (FakeSpool, running, Raw, real_spool).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvloop

from mtad.config.schema import Duration, Limits, Listener
from mtad.events import Event, EventBus
from mtad.ingest import Ingest
from mtad.receive.listeners import Receiver
from mtad.spool import Spool, SpoolFailed, SpoolFull

HOSTNAME = "mx.receive.test"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9a-f]{22})\r\n")


# -- helpers shared with test_relay, test_smuggling, test_badinput ----------------------------


class FakeSpool:
    """The spool's `store` contract in memory; `fail` makes every store raise it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.stored: list[tuple[Any, list[Any], bytes]] = []
        self.fail = fail

    async def store(self, envelope: Any, recipients: Any, body: bytes | memoryview) -> None:
        if self.fail is not None:
            raise self.fail
        self.stored.append((envelope, list(recipients), bytes(body)))


@dataclass
class Running:
    receiver: Receiver
    host: str
    port: int
    events: list[Event] = field(default_factory=list)
    spool: Any = None

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    async def raw(self) -> Raw:
        return await Raw.connect(self.host, self.port)

    def of_type(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]


@asynccontextmanager
async def running(*, spool: Any = None, limits: Limits | None = None, domains: tuple[str, ...] = ("example.test",),
                  listeners: list[Listener] | None = None, tls_context: ssl.SSLContext | None = None,
                  ingest: Any = None, tenants: Any = None, quotas: Any = None,
                  clock: Callable[[], float] = time.time) -> AsyncIterator[Running]:
    """A Receiver on 127.0.0.1:0 (its first listener), a FakeSpool unless `spool` is given."""
    bus = EventBus()
    spool = spool if spool is not None else FakeSpool()
    rx = Receiver(listeners=listeners or [Listener(address="127.0.0.1:0")], limits=limits or Limits(),
                  inbound_domains=domains, hostname=HOSTNAME, ingest=ingest or Ingest(spool, bus, HOSTNAME),
                  bus=bus, tls_context=tls_context, tenants=tenants, quotas=quotas, clock=clock)
    await rx.start()
    _, host, port = rx.bound()[0]
    run = Running(rx, host, port, spool=spool)
    bus.subscribe(run.events.append)
    try:
        yield run
    finally:
        clients, Raw.open_clients = Raw.open_clients, []
        for client in clients:
            await client.close()
        await rx.stop_accepting()
        await rx.drain(0)


@asynccontextmanager
async def real_spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool.open(str(tmp_path / "spool"), map_size=64 * 1024**2, commit_linger=0.002, commit_max_batch=256)
    spool.recover()
    try:
        yield spool
    finally:
        await spool.close()


class Raw:
    """A byte-exact SMTP client: send exactly these bytes, read whole replies."""

    open_clients: ClassVar[list[Raw]] = []  # closed by running() on the way out

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Raw.open_clients.append(self)

    @classmethod
    async def connect(cls, host: str, port: int, *, greet: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        raw = cls(reader, writer)
        if greet:
            banner = await raw.reply()
            assert banner == f"220 {HOSTNAME} ESMTP mtad\r\n".encode(), banner
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5) -> bytes:
        """One complete (possibly multi-line) reply; b"" if the server closed first."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def expect(self, prefix: bytes) -> bytes:
        got = await self.reply()
        assert got.startswith(prefix), (prefix, got)
        return got

    async def ask(self, data: bytes, prefix: bytes) -> bytes:
        await self.send(data)
        return await self.expect(prefix)

    async def closed_by_server(self, timeout: float = 5) -> bool:
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll with a deadline (not a sleep as synchronisation)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def transaction(raw: Raw, *, sender: bytes = b"<s@origin.test>", rcpts: tuple[bytes, ...] = (b"<u@example.test>",),
                      body: bytes = b"Subject: t\r\n\r\nhello\r\n", ehlo: bool = True) -> bytes:
    """EHLO (or HELO) and one full transaction; returns the reply after the final dot."""
    await raw.ask(b"EHLO client.test\r\n" if ehlo else b"HELO client.test\r\n", b"250")
    return await send_mail(raw, sender, rcpts, body)


async def send_mail(raw: Raw, sender: bytes, rcpts: tuple[bytes, ...], body: bytes) -> bytes:
    """MAIL, RCPT each of `rcpts` (all must be accepted), DATA and the body; returns the reply after the dot."""
    await raw.ask(b"MAIL FROM:" + sender + b"\r\n", b"250 2.1.0")
    for rcpt in rcpts:
        await raw.ask(b"RCPT TO:" + rcpt + b"\r\n", b"250 2.1.5")
    await raw.ask(b"DATA\r\n", b"354 ")
    await raw.send(body + b".\r\n")
    return await raw.reply()


# -- greeting, EHLO, a plain message ----------------------------------------------------------


@pytest.mark.asyncio
async def test_banner_and_ehlo_advertise_exactly_our_extensions() -> None:
    async with running(limits=Limits(max_message_size=1_000_000)) as rx:
        raw = await rx.raw()
        got = await raw.ask(b"EHLO client.test\r\n", b"250-")
        assert got == (f"250-{HOSTNAME}\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
                       "250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n").encode()
        assert await raw.ask(b"HELO client.test\r\n", b"250 ") == f"250 {HOSTNAME}\r\n".encode()
        await raw.ask(b"NOOP\r\n", b"250 2.0.0")
        await raw.ask(b"VRFY someone\r\n", b"252 2.5.0")
        await raw.ask(b"EXPN list\r\n", b"502 5.5.1")
        await raw.ask(b"STARTTLS\r\n", b"454 4.7.0")
        await raw.ask(b"QUIT\r\n", b"221 2.0.0")
        assert await raw.closed_by_server()


@pytest.mark.asyncio
async def test_smtplib_message_lands_with_received_message_id_and_date(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool) as rx:
        def send() -> dict[str, Any]:
            with smtplib.SMTP(*rx.addr, timeout=10) as client:
                return client.sendmail("s@origin.test", ["u@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert await asyncio.to_thread(send) == {}
        [message] = list(spool.messages())
        body = spool.read_body(message.envelope.id)
        assert body is not None
        queue_id = message.envelope.id
        head = body.split(b"\r\nSubject: hi\r\n")[0].decode()
        assert re.fullmatch(
            rf"Received: from \[127\.0\.0\.1\] \(unknown \[127\.0\.0\.1\]\)\r\n"
            rf"\tby {re.escape(HOSTNAME)} \(mtad\) with ESMTP id {queue_id}\r\n"
            rf"\tfor <u@example\.test>; \w{{3}}, \d\d \w{{3}} \d{{4}} \d\d:\d\d:\d\d \+0000\r\n"
            rf"Message-ID: <{queue_id}@{re.escape(HOSTNAME)}>\r\n"
            rf"Date: \w{{3}}, \d\d \w{{3}} \d{{4}} \d\d:\d\d:\d\d \+0000", head), head
        assert body.endswith(b"\r\n\r\nhello\r\n")
        assert message.envelope.sender == "s@origin.test"
        assert message.envelope.message_id == f"<{queue_id}@{HOSTNAME}>"
        assert message.envelope.size == len(body)
        assert [r.address for r in message.recipients] == ["u@example.test"]
        [event] = rx.of_type("received")
        assert (event.queue_id, event.sender, event.recipients, event.size, event.listener) == (
            queue_id, "s@origin.test", ["u@example.test"], len(body), "mx")
        assert event.reply == f"250 2.0.0 Ok: queued as {queue_id}"
        assert event.client_address == "127.0.0.1" and event.helo


@pytest.mark.asyncio
async def test_existing_message_id_and_date_are_kept_and_no_for_clause_with_two_recipients() -> None:
    async with running() as rx:
        raw = await rx.raw()
        body = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <abc@origin.test>\r\n\r\nx\r\n"
        got = await transaction(raw, rcpts=(b"<a@example.test>", b"<b@example.test>"), body=body)
        assert QUEUED.fullmatch(got), got
        [(envelope, recipients, stored)] = rx.spool.stored
        assert stored.count(b"Message-ID:") == 1 and stored.count(b"Date:") == 1
        assert envelope.message_id == "<abc@origin.test>"
        received, _ = stored.split(b"\r\nDate:", 1)
        assert b" for " not in received and received.endswith(b"+0000")
        assert [r.address for r in recipients] == ["a@example.test", "b@example.test"]


@pytest.mark.asyncio
async def test_pipelined_transaction_gets_replies_in_order() -> None:
    async with running() as rx:
        raw = await rx.raw()
        await raw.send(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<u@example.test>\r\n"
                       b"RCPT TO:<u@elsewhere.test>\r\nDATA\r\n")
        assert (await raw.reply()).startswith(b"250-")
        assert [await raw.reply() for _ in range(4)] == [
            b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n",
            b"550 5.7.1 Relay access denied\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        await raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n"
                       b"Subject: q\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        replies = [await raw.reply() for _ in range(6)]
        assert QUEUED.fullmatch(replies[0]) and QUEUED.fullmatch(replies[4]), replies
        assert replies[1:4] == [b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n",
                                b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        assert replies[5] == b"221 2.0.0 Bye\r\n"
        assert [s[0].sender for s in rx.spool.stored] == ["s@o.test", ""]


@pytest.mark.asyncio
async def test_dsn_body_and_smtputf8_parameters_are_kept(tmp_path: Path) -> None:
    async with real_spool(tmp_path) as spool, running(spool=spool, domains=("example.test", "éxample.test")) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        await raw.ask(b"MAIL FROM:<s@o.test> RET=HDRS ENVID=QQ+2Bx BODY=8BITMIME SMTPUTF8 SIZE=100\r\n", b"250 2.1.0")
        await raw.ask(b"RCPT TO:<u@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40example.test\r\n",
                      b"250 2.1.5")
        await raw.ask("RCPT TO:<jöran@ÉXAMPLE.test> NOTIFY=NEVER\r\n".encode(), b"250 2.1.5")
        await raw.ask(b"DATA\r\n", b"354")
        await raw.send("Subject: héllo\r\n\r\nbody\r\n.\r\n".encode())
        match = QUEUED.fullmatch(await raw.reply())
        assert match
        message = spool.get(match[1].decode())
        assert message is not None
        env = message.envelope
        assert (env.ret, env.envid, env.body_type, env.smtputf8, env.protocol) == (
            "HDRS", "QQ+2Bx", "8BITMIME", True, "UTF8SMTP")
        first, second = message.recipients
        assert (first.address, first.notify, first.orcpt) == ("u@example.test", "SUCCESS,FAILURE",
                                                              "rfc822;u+40example.test")
        assert (second.address, second.notify) == ("jöran@xn--xample-9ua.test", "NEVER")


# -- limits --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_size_limit_on_mail_and_after_the_dot() -> None:
    async with running(limits=Limits(max_message_size=2000)) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        await raw.ask(b"MAIL FROM:<s@o.test> SIZE=2001\r\n", b"552 5.3.4")
        got = await transaction(raw, body=b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 25)
        assert got == b"552 5.3.4 Message size exceeds fixed limit\r\n"
        assert rx.spool.stored == []
        assert QUEUED.fullmatch(await transaction(raw, body=b"Subject: small\r\n\r\nok\r\n"))
        assert [e.reply for e in rx.of_type("rejected")] == ["552 5.3.4 Message size exceeds fixed limit"] * 2


@pytest.mark.asyncio
async def test_recipient_limit_answers_452_and_keeps_the_first_ones() -> None:
    async with running(limits=Limits(max_recipients=2)) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        await raw.ask(b"MAIL FROM:<s@o.test>\r\n", b"250")
        await raw.ask(b"RCPT TO:<a@example.test>\r\n", b"250 2.1.5")
        await raw.ask(b"RCPT TO:<a@example.test>\r\n", b"250 2.1.5")  # a duplicate costs nothing
        await raw.ask(b"RCPT TO:<b@example.test>\r\n", b"250 2.1.5")
        await raw.ask(b"RCPT TO:<c@example.test>\r\n", b"452 4.5.3")
        await raw.ask(b"DATA\r\n", b"354")
        assert QUEUED.fullmatch(await raw.ask(b"Subject: x\r\n\r\n.\r\n", b"250"))
        assert [r.address for r in rx.spool.stored[0][1]] == ["a@example.test", "b@example.test"]
        [refused] = rx.of_type("rejected")
        assert refused.recipients == ["c@example.test"] and refused.reply.startswith("452 4.5.3")


@pytest.mark.asyncio
async def test_idle_timeout_sends_421_and_closes() -> None:
    async with running(limits=Limits(idle_timeout=Duration(0.3))) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\n", b"250")
        assert await raw.reply(timeout=5) == b"421 4.4.2 Idle timeout, closing connection\r\n"
        assert await raw.closed_by_server()
        await wait_until(lambda: rx.receiver.session_count() == 0)


@pytest.mark.asyncio
async def test_data_timeout_closes_and_stores_nothing() -> None:
    async with running(limits=Limits(data_timeout=Duration(0.3), idle_timeout=Duration(30))) as rx:
        raw = await rx.raw()
        await raw.ask(b"EHLO c.test\r\nMAIL FROM:<s@o.test>\r\n", b"250")
        await raw.expect(b"250")
        await raw.ask(b"RCPT TO:<u@example.test>\r\nDATA\r\n", b"250")
        await raw.expect(b"354")
        await raw.send(b"Subject: slow\r\n")
        assert await raw.reply(timeout=5) == b"421 4.4.2 Idle timeout, closing connection\r\n"
        assert await raw.closed_by_server()
        assert rx.spool.stored == []


@pytest.mark.asyncio
async def test_per_ip_and_per_listener_connection_limits() -> None:
    limits = Limits(max_connections_per_ip=2)
    listeners = [Listener(address="127.0.0.1:0", max_connections=3), Listener(address="127.0.0.1:0")]
    async with running(limits=limits, listeners=listeners) as rx:
        second_port = rx.receiver.bound()[1][2]
        a, b = await rx.raw(), await Raw.connect(rx.host, second_port)  # per IP counts over all listeners
        third = await Raw.connect(rx.host, rx.port, greet=False)
        assert await third.reply() == b"421 4.7.0 Too many connections from your address\r\n"
        assert await third.closed_by_server()
        await b.close()
        await wait_until(lambda: rx.receiver.session_count() == 1)
        c = await rx.raw()
        await c.ask(b"NOOP\r\n", b"250")
        # The listener limit: at most 3 sessions on the first listener.
        rx.receiver.reload(limits=Limits(max_connections_per_ip=100), inbound_domains=["example.test"],
                           tls_context=None)
        d = await rx.raw()
        e = await Raw.connect(rx.host, rx.port, greet=False)
        assert await e.reply() == b"421 4.3.2 Too many connections, try again later\r\n"
        for client in (a, c, d, e):
            await client.close()


@pytest.mark.asyncio
async def test_bad_commands_past_the_limit_get_421_and_close() -> None:
    async with running(limits=Limits(max_bad_commands=3)) as rx:
        raw = await rx.raw()
        for _ in range(3):
            await raw.ask(b"BOGUS\r\n", b"500 5.5.1")
        await raw.send(b"BOGUS\r\n")
        assert await raw.reply() == b"500 5.5.1 Command unrecognized\r\n"
        assert await raw.reply() == b"421 4.7.0 Too many errors, closing connection\r\n"
        assert await raw.closed_by_server()


# -- failures: spool refusals and our own bugs never leak text --------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("error", "expected"), [
    (SpoolFull("map full at /secret/path"), b"452 4.3.1 Insufficient system storage\r\n"),
    (SpoolFailed("EIO on /secret/path"), b"451 4.3.0 Local error in processing\r\n"),
])
async def test_spool_refusal_maps_to_a_bland_reply_and_a_rejected_event(error: Exception, expected: bytes) -> None:
    async with running(spool=FakeSpool(fail=error)) as rx:
        raw = await rx.raw()
        assert await transaction(raw) == expected
        [event] = rx.of_type("rejected")
        assert event.reply == expected.decode().strip() and event.recipients == ["u@example.test"]
        assert rx.of_type("received") == []
        assert await transaction(raw, ehlo=False) == expected  # the session carries on


class ExplodingIngest:
    async def accept(self, submission: Any) -> str:
        raise RuntimeError("secret internal detail")


@pytest.mark.asyncio
async def test_an_exception_becomes_451_without_its_text() -> None:
    async with running(ingest=ExplodingIngest()) as rx:
        raw = await rx.raw()
        got = await transaction(raw)
        assert got == b"451 4.3.0 Local error in processing\r\n"
        await raw.ask(b"NOOP\r\n", b"250")  # still talking


@pytest.mark.asyncio
async def test_hop_limit_refuses_a_loop() -> None:
    async with running(limits=Limits(max_received_headers=5)) as rx:
        raw = await rx.raw()
        hop = b"Received: from h.test\r\n\tby x.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        assert await transaction(raw, body=hop * 6 + b"Subject: loop\r\n\r\nx\r\n") == (
            b"554 5.4.6 Too many hops, mail loop detected\r\n")
        assert QUEUED.fullmatch(await transaction(raw, body=hop * 5 + b"Subject: ok\r\n\r\nx\r\n"))


# -- lifecycle: start errors, reload, drain, uvloop, STARTTLS -----------------------------------


@pytest.mark.asyncio
async def test_start_names_the_address_it_cannot_bind() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bus = EventBus()
        rx = Receiver(listeners=[Listener(address="127.0.0.1:0"), Listener(address=f"127.0.0.1:{port}")],
                      limits=Limits(), inbound_domains=[], hostname=HOSTNAME,
                      ingest=Ingest(FakeSpool(), bus, HOSTNAME), bus=bus, tls_context=None)
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await rx.start()
        assert rx.bound() == []


@pytest.mark.asyncio
async def test_reload_applies_to_new_sessions() -> None:
    async with running(domains=("example.test",)) as rx:
        old = await rx.raw()
        rx.receiver.reload(limits=Limits(max_recipients=1), inbound_domains=["new.test"], tls_context=None)
        new = await rx.raw()
        for raw in (old, new):
            await raw.ask(b"EHLO c.test\r\n", b"250")
            await raw.ask(b"MAIL FROM:<s@o.test>\r\n", b"250")
        await new.ask(b"RCPT TO:<u@example.test>\r\n", b"550 5.7.1")
        await new.ask(b"RCPT TO:<u@new.test>\r\n", b"250")
        await new.ask(b"RCPT TO:<v@new.test>\r\n", b"452 4.5.3")
        await old.ask(b"RCPT TO:<u@example.test>\r\n", b"250")


@pytest.mark.asyncio
async def test_drain_lets_sessions_finish_then_421s_the_rest() -> None:
    async with running() as rx:
        quitter, lingerer = await rx.raw(), await rx.raw()
        await rx.receiver.stop_accepting()
        with pytest.raises(OSError):
            await Raw.connect(rx.host, rx.port)
        drain = asyncio.create_task(rx.receiver.drain(0.5))
        await quitter.ask(b"QUIT\r\n", b"221")
        assert QUEUED.fullmatch(await transaction(lingerer))  # still served during the grace period
        assert await lingerer.reply(timeout=5) == b"421 4.3.2 Service shutting down, try again later\r\n"
        await drain
        assert rx.receiver.session_count() == 0


def test_runs_on_uvloop() -> None:
    async def main() -> None:
        async with running() as rx:
            raw = await rx.raw()
            assert QUEUED.fullmatch(await transaction(raw))
            await raw.ask(b"QUIT\r\n", b"221")
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOSTNAME}",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.asyncio
async def test_starttls_then_esmtps_in_received(tls_context: ssl.SSLContext) -> None:
    async with running(tls_context=tls_context) as rx:
        def send() -> tuple[bytes, bytes]:
            with smtplib.SMTP(*rx.addr, timeout=10) as client:
                features = client.ehlo()[1]
                client.starttls(context=ssl._create_unverified_context())
                after = client.ehlo()[1]
                client.sendmail("s@o.test", ["u@example.test"], b"Subject: tls\r\n\r\nsecret\r\n")
                return features, after
        before, after = await asyncio.to_thread(send)
        assert b"STARTTLS" in before and b"STARTTLS" not in after
        [(envelope, _, body)] = rx.spool.stored
        assert envelope.protocol == "ESMTPS" and b"with ESMTPS id " in body
