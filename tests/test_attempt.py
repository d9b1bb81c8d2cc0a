"""deliver() and Pool against real servers on loopback: reuse, limits, expiry, MX fall-through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from peer import Peer, SmtpSink, closed_port

from mtad.deliver.attempt import AttemptResult, deliver
from mtad.deliver.client import ClientSettings
from mtad.deliver.pool import Pool
from mtad.deliver.route import NextHop
from mtad.records import Envelope, Recipient

BODY = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hello\r\n\r\nHello.\r\n"
KEY = "dst.test"


def settings(**changes: object) -> ClientSettings:
    base: dict[str, object] = {
        "helo_name": "client.test", "connect_timeout": 5, "greeting_timeout": 5, "command_timeout": 5,
        "data_timeout": 5, "data_block_timeout": 5, "final_timeout": 5, "quit_timeout": 1, "tls": "none"}
    base.update(changes)
    return ClientSettings(**base)  # type: ignore[arg-type]


ENVELOPE = Envelope(id="0" * 22, sender="a@src.test", arrival_time=0, size=len(BODY))


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(address=a) for a in addresses]


def hop(*servers: Peer | int, host: str = "mx.dst.test") -> NextHop:
    """One next hop on 127.0.0.1: every server must share one port, so one peer or closed port."""
    [port] = {s.port if isinstance(s, Peer) else s for s in servers}
    return NextHop(host=host, port=port, addresses=["127.0.0.1"], mx=True)


async def send(hops: list[NextHop], recipients: list[Recipient], pool: Pool, cs: ClientSettings, *,
               key: str = KEY) -> AttemptResult:
    return await deliver(key, hops, ENVELOPE, recipients, BODY, pool, cs)


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def quits(peer: Peer) -> int:
    return sum(1 for c in peer.connections if c.commands and c.commands[-1][1] == "QUIT")


@pytest.mark.asyncio
async def test_one_message_and_the_connection_goes_back_to_the_pool() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_messages=100)
    async with Peer() as peer:
        result = await send([hop(peer)], rcpts("b@dst.test", "550-c@dst.test"), pool, cs)
        assert [o.kind for o in result.outcomes] == ["delivered", "bounced"]
        assert result.relay == f"mx.dst.test[127.0.0.1]:{peer.port}" and result.connected
        assert (pool.idle(KEY), pool.active(KEY)) == (1, 0)
        await pool.close()
        assert pool.idle(KEY) == 0 and quits(peer) == 1


@pytest.mark.asyncio
async def test_reuse_and_max_messages_per_connection() -> None:
    cs = settings(max_messages=4)
    pool = Pool(cs, idle_timeout=30, max_messages=4)
    async with Peer() as peer:
        for n in range(10):
            result = await send([hop(peer)], rcpts(f"r{n}@dst.test"), pool, cs)
            assert result.outcomes[0].kind == "delivered"
        await pool.close()
        assert [t.connection for t in peer.transactions] == [1] * 4 + [2] * 4 + [3] * 2
        assert quits(peer) == 3


@pytest.mark.asyncio
async def test_concurrent_attempts_use_separate_connections_and_count_active() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_messages=100)
    async with Peer(slow=0.3) as peer:
        running = [asyncio.create_task(send([hop(peer)], rcpts(f"slow-{n}@dst.test"), pool, cs)) for n in range(3)]
        await until(lambda: pool.active(KEY) == 3)
        results = await asyncio.gather(*running)
        assert all(r.outcomes[0].kind == "delivered" for r in results)
        assert (pool.active(KEY), pool.idle(KEY), len(peer.connections)) == (0, 3, 3)
        await pool.close()


@pytest.mark.asyncio
async def test_idle_timeout_closes_and_zero_closes_at_once() -> None:
    cs = settings()
    async with Peer() as peer:
        pool = Pool(cs, idle_timeout=0.2, max_messages=100)
        await send([hop(peer)], rcpts("b@dst.test"), pool, cs)
        assert pool.idle(KEY) == 1
        await until(lambda: pool.idle(KEY) == 0 and quits(peer) == 1)
        await send([hop(peer)], rcpts("b@dst.test"), pool, cs)
        assert len(peer.connections) == 2  # the expired one was not reused
        await pool.close()
    async with Peer() as peer:
        pool = Pool(cs, idle_timeout=0, max_messages=100)
        await send([hop(peer)], rcpts("b@dst.test"), pool, cs)
        assert pool.idle(KEY) == 0
        await pool.close()
        assert quits(peer) == 1


@pytest.mark.asyncio
async def test_pooled_connection_closed_by_the_server_is_replaced() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_messages=100)
    async with Peer() as peer:
        await send([hop(peer)], rcpts("b@dst.test"), pool, cs)
        peer.kick()  # 421 and close, as a server ending an idle session does
        result = await send([hop(peer)], rcpts("c@dst.test"), pool, cs)
        assert result.outcomes[0].kind == "delivered"
        assert [t.connection for t in peer.transactions] == [1, 2]
        await pool.close()


@pytest.mark.asyncio
async def test_fall_through_when_the_first_mx_refuses_or_greets_421_or_tarpits() -> None:
    cs = settings(greeting_timeout=0.3)
    pool = Pool(cs, idle_timeout=0, max_messages=100)
    async with Peer(greeting=421) as busy, Peer(tarpit=True) as tarpit, Peer() as good:
        hops = [hop(closed_port(), host="mx1.dst.test"), hop(busy, host="mx2.dst.test"),
                hop(tarpit, host="mx3.dst.test"), hop(good, host="mx4.dst.test")]
        result = await send(hops, rcpts("b@dst.test", "tempfail-c@dst.test"), pool, cs)
        assert [o.kind for o in result.outcomes] == ["delivered", "deferred"]
        assert result.relay == f"mx4.dst.test[127.0.0.1]:{good.port}"
        assert len(busy.connections) == 1 and len(tarpit.connections) == 1
        assert [t.recipients for t in good.transactions] == [["b@dst.test"]]
        await pool.close()


@pytest.mark.asyncio
async def test_every_host_failing_gives_the_last_connection_outcome() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=0, max_messages=100)
    result = await send([hop(closed_port())], rcpts("a@dst.test", "b@dst.test"), pool, cs)
    assert not result.connected and result.relay == ""
    assert {(o.kind, o.scope, o.status, o.phase) for o in result.outcomes} == {
        ("deferred", "connection", "4.4.1", "connect")}
    async with Peer(greeting=421) as busy:
        result = await send([hop(closed_port()), hop(busy)], rcpts("a@dst.test"), pool, cs)
        # A 421 greeting is remote words, but the destination is not taking mail: not connected.
        assert not result.connected and result.outcomes[0].reply.startswith("421")
    result = await send([], rcpts("a@dst.test"), pool, cs)
    assert result.outcomes[0].kind == "deferred" and not result.connected
    await pool.close()


@pytest.mark.asyncio
async def test_session_lost_mid_transaction_tries_the_next_mx() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_messages=100)
    async with Peer() as first, Peer(scripted=False) as second:
        result = await send([hop(first), hop(second)], rcpts("a@dst.test", "550-b@dst.test", "421-c@dst.test"),
                            pool, cs)
        assert [(o.kind, o.scope) for o in result.outcomes] == [
            ("delivered", "message"), ("bounced", "recipient"), ("delivered", "message")]
        assert first.transactions == []
        assert [t.recipients for t in second.transactions] == [["a@dst.test", "421-c@dst.test"]]
        assert result.relay.endswith(f":{second.port}") and pool.idle(KEY) == 1
        await pool.close()


@pytest.mark.asyncio
async def test_recipient_refusals_do_not_fall_through() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=0, max_messages=100)
    async with Peer() as first, Peer() as second:
        result = await send([hop(first), hop(second)], rcpts("tempfail-a@dst.test", "552-b@dst.test"), pool, cs)
        assert [(o.kind, o.status) for o in result.outcomes] == [("deferred", "4.2.0"), ("bounced", "5.2.2")]
        assert second.connections == []
        await pool.close()


@pytest.mark.asyncio
async def test_large_batch_in_several_transactions() -> None:
    cs = settings(max_recipients=2)
    pool = Pool(cs, idle_timeout=0, max_messages=100)
    async with Peer() as peer:
        result = await send([hop(peer)], rcpts(*[f"r{i}@dst.test" for i in range(5)]), pool, cs)
        assert [o.kind for o in result.outcomes] == ["delivered"] * 5
        assert [len(t.recipients) for t in peer.transactions] == [2, 2, 1]
        assert {t.connection for t in peer.transactions} == {1}
        await pool.close()


needs_sink = pytest.mark.skipif(not SmtpSink.available(), reason="smtp-sink (Debian postfix) not installed")


@needs_sink
@pytest.mark.peer
@pytest.mark.asyncio
async def test_smtp_sink_reuse_through_the_pool() -> None:
    cs = settings(max_messages=50)
    pool = Pool(cs, idle_timeout=30, max_messages=50)
    with SmtpSink() as sink:
        hops = [NextHop(host="sink.test", port=sink.port, addresses=["127.0.0.1"], mx=False)]
        for n in range(120):
            result = await send(hops, rcpts(f"a{n}@dst.test", f"b{n}@dst.test"), pool, cs)
            assert [o.kind for o in result.outcomes] == ["delivered"] * 2
        assert pool.idle(KEY) == 1
        await pool.close()


@pytest.mark.asyncio
async def test_452_too_many_recipients_go_in_the_next_transaction() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=0, max_messages=100)
    async with Peer(max_recipients=2) as peer:
        result = await send([hop(peer)], rcpts(*[f"r{i}@dst.test" for i in range(5)], "550-x@dst.test"), pool, cs)
        assert [o.kind for o in result.outcomes] == ["delivered"] * 5 + ["bounced"]
        assert [t.recipients for t in peer.transactions] == [
            ["r0@dst.test", "r1@dst.test"], ["r2@dst.test", "r3@dst.test"], ["r4@dst.test"]]
        await pool.close()
    async with Peer(max_recipients=1) as peer:  # the one accepted fails at the dot: the 452 one still goes
        result = await send([hop(peer)], rcpts("552-a@dst.test", "b@dst.test"), pool, cs)
        assert [(o.kind, o.status) for o in result.outcomes] == [("bounced", "5.2.2"), ("delivered", "2.0.0")]
        assert [t.recipients for t in peer.transactions] == [["552-a@dst.test"], ["b@dst.test"]]
        await pool.close()


@pytest.mark.asyncio
async def test_domains_on_one_server_share_its_idle_connections() -> None:
    """Many domains hosted on one MX: an idle connection opened for one is borrowed by the next
    (same server address and port), and idle connections per server are capped."""
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_messages=100, max_idle_per_server=2)
    async with Peer() as peer:
        for i in range(6):
            result = await send([hop(peer)], rcpts(f"user@d{i}.test"), pool, cs, key=f"d{i}.test")
            assert result.outcomes[0].kind == "delivered"
        await peer.await_transactions(6)
        assert len(peer.connections) == 1  # one session carried all six domains
        # Stricter TLS modes never borrow: their keys carry " tls=<mode>".
        assert pool.take_server("d9.test tls=require", *peer.address) is None
    await pool.close()


@pytest.mark.asyncio
async def test_idle_connections_per_server_are_capped() -> None:
    cs = settings()
    pool = Pool(cs, idle_timeout=30, max_idle_per_server=2, max_messages=100)
    async with Peer(slow=0.3) as peer:
        results = await asyncio.gather(*(send([hop(peer)], rcpts(f"slow-user@d{i}.test"), pool, cs, key=f"d{i}.test")
                                         for i in range(4)))
        assert all(r.outcomes[0].kind == "delivered" for r in results)
        assert len(peer.connections) == 4  # they overlapped: one connection each
        assert sum(pool.idle(f"d{i}.test") for i in range(4)) == 2  # the two oldest were closed
    await pool.close()
