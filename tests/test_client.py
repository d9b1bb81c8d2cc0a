"""SmtpConnection against real servers on loopback: the scripted peer and Postfix's smtp-sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from peer import Peer, SmtpSink, tls_files

from mtad.deliver.client import (
    ClientSettings,
    SessionFailed,
    SmtpConnection,
    dot_stuff,
    parse_ehlo,
    parse_reply_line,
)
from mtad.records import Envelope, Recipient

BODY = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hello\r\n\r\nHello.\r\n"


def settings(**changes: object) -> ClientSettings:
    base: dict[str, object] = {
        "helo_name": "client.test", "connect_timeout": 5, "greeting_timeout": 5, "command_timeout": 5,
        "data_timeout": 5, "data_block_timeout": 5, "final_timeout": 5, "quit_timeout": 1}
    base.update(changes)
    return ClientSettings(**base)  # type: ignore[arg-type]


def envelope(**changes: object) -> Envelope:
    return Envelope(id="0" * 22, sender="a@src.test", arrival_time=0, size=len(BODY), **changes)  # type: ignore[arg-type]


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(address=a) for a in addresses]


@asynccontextmanager
async def session(peer: Peer, host: str = "mx.peer.test", **changes: object) -> AsyncIterator[SmtpConnection]:
    conn = await SmtpConnection.open(host, peer.host, peer.port, settings(**changes))
    try:
        yield conn
    finally:
        await conn.close()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def hostile_server(script: Script) -> AsyncIterator[int]:
    """A server on 127.0.0.1:0 (its port yielded) that runs `script` on each connection, then drops
    it. On the way out without an error, the session must have ended within 5 s."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except OSError:
            pass
        finally:
            writer.transport.abort()
            done.set()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        server.close()
        await server.wait_closed()


class Ticker:
    """Counts loop turns while something waits: the largest gap shows whether the loop was free."""

    def __init__(self) -> None:
        self.ticks, self.gap = 0, 0.0

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.ticks, self.gap, last = self.ticks + 1, max(self.gap, now - last), now


# --- pure pieces --------------------------------------------------------------------------------

def test_reply_lines_parse_strictly() -> None:
    assert parse_reply_line(b"250-PIPELINING\r\n") == (250, True, "PIPELINING")
    assert parse_reply_line(b"550 5.1.1 no\r\n") == (550, False, "5.1.1 no")
    assert parse_reply_line(b"354\r\n") == (354, False, "")
    for bad in (b"25\r\n", b"abc ok\r\n", b"250+x\r\n", b"999 x\r\n", b"150 x\r\n"):
        with pytest.raises(ValueError):
            parse_reply_line(bad)


def test_ehlo_keywords() -> None:
    ext = parse_ehlo(["mx.test greets you", "pipelining", "SIZE 1000", "8BITMIME", "AUTH PLAIN LOGIN"])
    assert ext == {"PIPELINING": "", "SIZE": "1000", "8BITMIME": "", "AUTH": "PLAIN LOGIN"}


def unstuff(stream: bytes) -> bytes:
    """What a receiver makes of a DATA stream (RFC 5321 4.5.2), the terminator removed."""
    assert stream.endswith(b"\r\n.\r\n") or stream == b".\r\n"
    lines = stream[:-3].split(b"\r\n")
    assert b"." not in lines[:-1], "a lone dot inside the data would end it early"
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@given(st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b"\r\n.\r\n", b" ."]), max_size=12))
def test_dot_stuffing_round_trips(parts: list[bytes]) -> None:
    body = b"\r\n".join(parts)
    body = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert unstuff(dot_stuff(body)) == body


# --- against the scripted peer ------------------------------------------------------------------

@pytest.mark.asyncio
async def test_one_message_arrives_exactly() -> None:
    async with Peer() as peer, session(peer) as conn:
        assert conn.relay == f"mx.peer.test[127.0.0.1]:{peer.port}" and not conn.tls
        [outcome] = await conn.send(envelope(), rcpts("b@dst.test"), BODY)
        assert (outcome.kind, outcome.status, outcome.phase) == ("delivered", "2.0.0", "dot")
        [tx] = await peer.await_transactions(1)
        assert (tx.sender, tx.recipients, tx.data, tx.helo) == ("a@src.test", ["b@dst.test"], BODY, "client.test")
        assert tx.mail_params == [f"SIZE={len(BODY)}"] and conn.transactions == 1 and conn.usable


@pytest.mark.asyncio
async def test_mixed_recipients_in_one_transaction() -> None:
    async with Peer() as peer, session(peer) as conn:
        got = await conn.send(envelope(), rcpts("ok1@d.test", "tempfail-2@d.test", "550-3@d.test", "ok4@d.test"),
                              BODY)
        assert [(o.kind, o.scope, o.status) for o in got] == [
            ("delivered", "message", "2.0.0"), ("deferred", "recipient", "4.2.0"),
            ("bounced", "recipient", "5.1.1"), ("delivered", "message", "2.0.0")]
        assert got[2].reply == "550 5.1.1 user unknown" and got[2].reason == "userunknown"
        [tx] = await peer.await_transactions(1)
        assert tx.recipients == ["ok1@d.test", "ok4@d.test"]


@pytest.mark.asyncio
async def test_pipelining_sends_mail_rcpts_and_data_in_one_write() -> None:
    async with Peer() as peer, session(peer) as conn:
        assert conn.pipelining
        await conn.send(envelope(), rcpts("a@d.test", "b@d.test", "c@d.test"), BODY)
    reads = [n for n, command in peer.connections[0].commands if command.split()[0] in ("MAIL", "RCPT", "DATA")]
    assert len(reads) == 5 and len(set(reads)) == 1


@pytest.mark.asyncio
async def test_without_pipelining_one_command_at_a_time() -> None:
    async with Peer(pipelining=False) as peer, session(peer) as conn:
        assert not conn.pipelining
        got = await conn.send(envelope(), rcpts("a@d.test", "550-b@d.test", "c@d.test"), BODY)
        assert [o.kind for o in got] == ["delivered", "bounced", "delivered"]
    reads = [n for n, command in peer.connections[0].commands if command.split()[0] in ("MAIL", "RCPT", "DATA")]
    assert len(reads) == 5 and len(set(reads)) == 5


@pytest.mark.asyncio
@pytest.mark.parametrize("pipelining", [True, False])
async def test_no_recipient_accepted_sends_no_data_and_resets_before_the_next(pipelining: bool) -> None:
    async with Peer(pipelining=pipelining) as peer, session(peer) as conn:
        got = await conn.send(envelope(), rcpts("550-a@d.test", "tempfail-b@d.test"), BODY)
        assert [o.kind for o in got] == ["bounced", "deferred"]
        [outcome] = await conn.send(envelope(), rcpts("c@d.test"), BODY)
        assert outcome.kind == "delivered"
        [tx] = await peer.await_transactions(1)
        assert tx.recipients == ["c@d.test"]
    verbs = [command.split()[0] for _, command in peer.connections[0].commands]
    first = verbs.index("MAIL")
    tail = verbs[first:first + 4]
    assert tail == (["MAIL", "RCPT", "RCPT", "DATA"] if pipelining else ["MAIL", "RCPT", "RCPT", "RSET"])
    assert "RSET" in verbs[first + 3:] and verbs[-1] == "QUIT"


@pytest.mark.asyncio
async def test_dot_stuffing_delivers_the_original_bytes() -> None:
    body = (b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nmiddle . line\r\n...\r\n"
            b"\r\n.\r\n. \r\nend")
    async with Peer() as peer, session(peer) as conn:
        [outcome] = await conn.send(envelope(), rcpts("b@d.test"), body)
        assert outcome.kind == "delivered"
        [tx] = await peer.await_transactions(1)
        assert tx.data == body + b"\r\n"  # a body without a final CRLF gets one
        [outcome] = await conn.send(envelope(), rcpts("b@d.test"), b".starts with a dot\r\n")
        assert (await peer.await_transactions(2))[1].data == b".starts with a dot\r\n"


@pytest.mark.asyncio
async def test_large_body_goes_in_blocks() -> None:
    body = b"Subject: big\r\n\r\n" + b".dotted line of some length to stuff\r\n" * 40_000
    async with Peer() as peer, session(peer) as conn:
        [outcome] = await conn.send(envelope(), rcpts("b@d.test"), body)
        assert outcome.kind == "delivered"
        [tx] = await peer.await_transactions(1)
        assert tx.data == body


@pytest.mark.asyncio
async def test_parameters_relayed_when_the_server_offers_them() -> None:
    env = envelope(smtputf8=True, body_type="8BITMIME", ret="HDRS", envid="QQ314159")
    recipient = Recipient(address="b@d.test", notify="SUCCESS,FAILURE", orcpt="rfc822;b+2Bx@d.test")
    async with Peer() as peer, session(peer) as conn:
        await conn.send(env, [recipient], BODY)
        [tx] = await peer.await_transactions(1)
        assert tx.mail_params == [f"SIZE={len(BODY)}", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=QQ314159"]
        assert tx.rcpt_params["b@d.test"] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b+2Bx@d.test"]
    async with Peer(dsn=False) as peer, session(peer) as conn:
        await conn.send(envelope(ret="FULL", envid="X"), [recipient], BODY)
        [tx] = await peer.await_transactions(1)
        assert tx.mail_params == [f"SIZE={len(BODY)}"] and tx.rcpt_params["b@d.test"] == []


@pytest.mark.asyncio
async def test_refusals_without_sending() -> None:
    async with Peer(size=100, smtputf8=False, eightbitmime=False) as peer, session(peer) as conn:
        big = await conn.send(envelope(), rcpts("a@d.test", "b@d.test"), b"x" * 101 + b"\r\n")
        assert [(o.kind, o.status, o.scope) for o in big] == [("bounced", "5.3.4", "message")] * 2
        [utf8] = await conn.send(envelope(smtputf8=True), rcpts("a@d.test"), BODY[:50])
        assert (utf8.kind, utf8.status) == ("bounced", "5.6.7")
        [eight] = await conn.send(envelope(body_type="8BITMIME"), rcpts("a@d.test"), BODY[:50])
        assert (eight.kind, eight.status) == ("bounced", "5.6.3")
        [fits] = await conn.send(envelope(), rcpts("a@d.test"), b"small\r\n")
        assert fits.kind == "delivered"
    assert [c for _, c in peer.connections[0].commands if c.startswith("MAIL")] == ["MAIL FROM:<a@src.test> SIZE=7"]


@pytest.mark.asyncio
async def test_helo_only_server() -> None:
    async with Peer(esmtp=False) as peer, session(peer) as conn:
        assert conn.extensions == {}
        [ok] = await conn.send(envelope(), rcpts("b@d.test"), BODY)
        [eight] = await conn.send(envelope(body_type="8BITMIME"), rcpts("b@d.test"), BODY)
        assert ok.kind == "delivered" and (eight.kind, eight.status) == ("bounced", "5.6.3")
        [tx] = await peer.await_transactions(1)
        assert tx.mail_params == [] and tx.helo == "client.test"
    assert [c.split()[0] for _, c in peer.connections[0].commands][:2] == ["EHLO", "HELO"]


@pytest.mark.asyncio
@pytest.mark.parametrize(("code", "kind"), [(421, "deferred"), (554, "deferred")])
async def test_greeting_refused(code: int, kind: str) -> None:
    async with Peer(greeting=code) as peer:
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("mx.peer.test", peer.host, peer.port, settings())
        outcome = failed.value.outcome
        assert (outcome.kind, outcome.scope, outcome.phase, outcome.remote) == (kind, "connection", "greeting", True)
        assert outcome.reply.startswith(str(code))


@pytest.mark.asyncio
async def test_421_mid_session() -> None:
    async with Peer() as peer, session(peer) as conn:
        got = await conn.send(envelope(), rcpts("a@d.test", "550-b@d.test", "421-c@d.test", "d@d.test"), BODY)
        assert [(o.kind, o.scope) for o in got] == [
            ("deferred", "connection"), ("bounced", "recipient"), ("deferred", "connection"), ("deferred", "connection")]
        assert got[0].reply.startswith("421 4.3.2") and not conn.usable
        [again] = await conn.send(envelope(), rcpts("a@d.test"), BODY)
        assert again.scope == "connection" and peer.transactions == []


@pytest.mark.asyncio
async def test_disconnect_in_data() -> None:
    body = BODY + b"more\r\n" * 20_000
    async with Peer() as peer, session(peer) as conn:
        got = await conn.send(envelope(), rcpts("disconnect-in-data-a@d.test", "550-b@d.test"), body)
        assert (got[0].kind, got[0].scope, got[0].status) == ("deferred", "connection", "4.4.2")
        assert got[0].phase in ("data", "dot") and got[1].kind == "bounced"
        assert not conn.usable and peer.transactions == []


@pytest.mark.asyncio
async def test_552_at_the_final_dot() -> None:
    async with Peer() as peer, session(peer) as conn:
        got = await conn.send(envelope(), rcpts("552-a@d.test", "b@d.test", "tempfail-c@d.test"), BODY)
        assert [(o.kind, o.status, o.phase) for o in got] == [
            ("bounced", "5.2.2", "dot"), ("bounced", "5.2.2", "dot"), ("deferred", "4.2.0", "rcpt")]
        assert conn.usable


@pytest.mark.asyncio
async def test_tarpit_greeting_times_out_and_the_loop_stays_free() -> None:
    ticker = Ticker()
    async with Peer(tarpit=True) as peer:
        tick = asyncio.create_task(ticker.run())
        started = time.monotonic()
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("mx.peer.test", peer.host, peer.port, settings(greeting_timeout=0.4))
        waited = time.monotonic() - started
        tick.cancel()
    outcome = failed.value.outcome
    assert (outcome.phase, outcome.status, outcome.reply) == ("greeting", "4.4.2", "timed out during greeting")
    assert 0.35 < waited < 3 and ticker.ticks >= 10 and ticker.gap < 0.2


@pytest.mark.asyncio
async def test_slow_rcpt_times_out_and_the_loop_stays_free() -> None:
    ticker = Ticker()
    async with Peer(slow=3) as peer, session(peer, command_timeout=0.4) as conn:
        tick = asyncio.create_task(ticker.run())
        got = await conn.send(envelope(), rcpts("a@d.test", "slow-b@d.test"), BODY)
        tick.cancel()
        assert [(o.kind, o.phase, o.scope) for o in got] == [("deferred", "rcpt", "connection")] * 2
        assert "timed out" in got[0].reply and not conn.usable
        assert ticker.ticks >= 10 and ticker.gap < 0.2


@pytest.mark.asyncio
async def test_hostile_reply_line_ends_the_session() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-" + b"x" * 100_000 + b"\r\n220 ok\r\n")
        await writer.drain()
        await reader.read()
    async with hostile_server(script) as port:
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("evil", "127.0.0.1", port, settings())
        assert failed.value.outcome.reply == "failed during greeting: malformed reply"


@pytest.mark.asyncio
async def test_source_address() -> None:
    async with Peer() as peer, session(peer, source_address="127.0.0.2") as conn:
        [outcome] = await conn.send(envelope(), rcpts("b@d.test"), BODY)
        assert outcome.kind == "delivered"
        [tx] = await peer.await_transactions(1)
        assert tx.client[0] == "127.0.0.2"


@pytest.mark.asyncio
async def test_ipv6_uses_source_address6() -> None:
    async with Peer(host="::1") as peer, session(peer, source_address="127.0.0.2", source_address6="::1") as conn:
        await conn.send(envelope(), rcpts("b@d.test"), BODY)
        [tx] = await peer.await_transactions(1)
        assert tx.client[0] == "::1" and conn.relay == f"mx.peer.test[::1]:{peer.port}"


@pytest.mark.asyncio
async def test_usable_until_max_messages() -> None:
    async with Peer() as peer, session(peer, max_messages=2) as conn:
        for _ in range(2):
            assert conn.usable
            await conn.send(envelope(), rcpts("b@d.test"), BODY)
        assert not conn.usable and conn.transactions == 2


# --- STARTTLS -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_starttls_opportunistic() -> None:
    async with Peer(starttls=True) as peer, session(peer) as conn:
        assert conn.tls and "STARTTLS" not in conn.extensions
        await conn.send(envelope(), rcpts("b@d.test"), BODY)
        [tx] = await peer.await_transactions(1)
        assert tx.tls


@pytest.mark.asyncio
async def test_starttls_handshake_failure_falls_back_to_plaintext() -> None:
    async with Peer(starttls=True, tls_broken=True) as peer:
        conn = await SmtpConnection.open("mx.peer.test", peer.host, peer.port, settings())
        try:
            assert not conn.tls
            [outcome] = await conn.send(envelope(), rcpts("b@d.test"), BODY)
            assert outcome.kind == "delivered"
        finally:
            await conn.close()
        assert len(peer.connections) == 2
        assert "STARTTLS" not in [c for _, c in peer.connections[1].commands]
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("mx.peer.test", peer.host, peer.port, settings(tls="require"))
        assert (failed.value.outcome.status, failed.value.outcome.kind) == ("4.7.5", "deferred")


@pytest.mark.asyncio
async def test_starttls_required() -> None:
    async with Peer() as peer:
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("mx.peer.test", peer.host, peer.port, settings(tls="require"))
        outcome = failed.value.outcome
        assert (outcome.kind, outcome.scope, outcome.status, outcome.phase) == (
            "deferred", "connection", "4.7.4", "starttls")
        assert [c for _, c in peer.connections[0].commands][-1] == "QUIT"
    async with Peer(starttls=True) as peer, session(peer, tls="require") as conn:
        assert conn.tls


@pytest.mark.asyncio
@pytest.mark.parametrize(("host", "ca", "good"), [
    ("mx.peer.test", True, True), ("localhost", True, True),
    ("wrong.example", True, False), ("mx.peer.test", False, False)],
    ids=["good", "good-localhost", "wrong-name", "untrusted"])
async def test_starttls_verify(host: str, ca: bool, good: bool) -> None:
    ca_file = str(tls_files().ca) if ca else ""
    async with Peer(starttls=True) as peer:
        if good:
            async with session(peer, host=host, tls="verify", ca_file=ca_file) as conn:
                assert conn.tls
                await conn.send(envelope(), rcpts("b@d.test"), BODY)
                assert (await peer.await_transactions(1))[0].tls
        else:
            with pytest.raises(SessionFailed) as failed:
                await SmtpConnection.open(host, peer.host, peer.port, settings(tls="verify", ca_file=ca_file))
            outcome = failed.value.outcome
            assert (outcome.kind, outcome.status, outcome.phase) == ("deferred", "4.7.5", "starttls")
            assert "not trusted" in outcome.reply and peer.transactions == []


@pytest.mark.asyncio
async def test_tls_none_ignores_starttls() -> None:
    async with Peer(starttls=True) as peer, session(peer, tls="none") as conn:
        assert not conn.tls and "STARTTLS" in conn.extensions


# --- against Postfix's smtp-sink ----------------------------------------------------------------

needs_sink = pytest.mark.skipif(not SmtpSink.available(), reason="smtp-sink (Debian postfix) not installed")


@needs_sink
@pytest.mark.peer
@pytest.mark.asyncio
@pytest.mark.parametrize("pipelining", [True, False])
async def test_smtp_sink_many_messages_one_connection(pipelining: bool) -> None:
    with SmtpSink(pipelining=pipelining) as sink:
        conn = await SmtpConnection.open("sink", "127.0.0.1", sink.port, settings(max_messages=1000))
        try:
            assert conn.pipelining == pipelining
            for n in range(200):
                got = await conn.send(envelope(), rcpts(*[f"r{n}-{i}@d.test" for i in range(n % 3 + 1)]), BODY)
                assert {o.kind for o in got} == {"delivered"}
            assert conn.transactions == 200 and conn.usable
        finally:
            await conn.close()


def test_starttls_and_pipelining_on_uvloop() -> None:
    """The daemon runs on uvloop: STARTTLS (StreamWriter.start_tls) and a transaction work there too."""
    import uvloop

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with Peer(starttls=True) as peer, session(peer, tls="verify", ca_file=str(tls_files().ca)) as conn:
            got = await conn.send(envelope(), rcpts("a@d.test", "550-b@d.test"), BODY)
            assert conn.tls and [o.kind for o in got] == ["delivered", "bounced"]
            assert (await peer.await_transactions(1))[0].data == BODY
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@pytest.mark.asyncio
async def test_cancelled_mid_transaction_leaves_the_connection_unusable() -> None:
    async with Peer(slow=5) as peer, session(peer) as conn:
        task = asyncio.create_task(conn.send(envelope(), rcpts("slow-a@d.test"), BODY))
        await until_seen(peer, "RCPT TO:<slow-a@d.test>")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not conn.usable


async def until_seen(peer: Peer, command: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not any(c == command for conn in peer.connections for _, c in conn.commands):
        assert time.monotonic() < deadline, f"{command} never arrived"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_plaintext_injected_after_starttls_is_refused() -> None:
    """A reply sent in the clear with the 220 must not be read as if it came over TLS."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 evil ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-evil\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")
        await reader.read()
    async with hostile_server(script) as port:
        started = time.monotonic()
        with pytest.raises(SessionFailed) as failed:
            await SmtpConnection.open("evil", "127.0.0.1", port, settings(tls="require", command_timeout=3))
        assert (failed.value.outcome.status, failed.value.outcome.reply) == ("4.7.5", "TLS handshake failed")
        assert time.monotonic() - started < 2  # refused at once, not after a handshake timing out
