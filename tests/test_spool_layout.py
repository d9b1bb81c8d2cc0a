"""How the spool uses its file: tables stay densely packed for stores in arrival order, keys out
of order still land where they belong, and store/delete churn reuses freed pages instead of
growing data.mdb (no read transaction left open pins old pages). Real LMDB in tmp_path; the
assertions are on LMDB's own page counts, never on timings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool, codec

MB = 1024 * 1024
PAGE_ROOM = 4096 - 16
"""Bytes a 4 KB LMDB page has for nodes (the page header takes 16)."""
BODY = b"x" * 1330
"""A 1.3 KB body: two fit a page, three do not. Plain puts in arrival order left one per page."""


def message(arrival: float) -> tuple[Envelope, list[Recipient]]:
    env = Envelope(id=new_queue_id(arrival), sender="alice@example.test", arrival_time=arrival,
                   size=len(BODY), message_id="<m@example.test>", client_address="127.0.0.1")
    return env, [Recipient(address="bob@example.net")]


def per_page(key: bytes, value: bytes) -> int:
    """Records of this size that fit one leaf page: node header 8, key, value, 2-byte index."""
    node = 8 + len(key) + len(value)
    return PAGE_ROOM // (node + node % 2 + 2)


def table_stats(directory: Path) -> dict[str, Any]:
    env = lmdb.open(str(directory), max_dbs=10, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {name: txn.stat(env.open_db(name.encode(), txn=txn, create=False))
                    for name in (codec.ENVELOPE, codec.BODY, codec.RECIPIENT, codec.DUE)}
    finally:
        env.close()


async def store_in_groups(spool: Spool, count: int, group: int, start: float) -> list[Envelope]:
    """`count` messages, `group` concurrent stores at a time (as concurrent SMTP sessions do)."""
    stored: list[Envelope] = []
    for first in range(0, count, group):
        batch = [message(start + (first + i) / 1000) for i in range(min(group, count - first))]
        await asyncio.gather(*(spool.store(env, rcpts, BODY) for env, rcpts in batch))
        stored.extend(env for env, _ in batch)
    return stored


@pytest.mark.asyncio
async def test_stores_in_arrival_order_keep_every_table_densely_packed(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool.open(str(directory), map_size=64 * MB)
    try:
        stored = await store_in_groups(spool, 400, 20, time.time())
        env, rcpts = message(stored[0].arrival_time)
        mkey = codec.message_key(stored[0].id)
        sizes = {
            codec.ENVELOPE: per_page(mkey, codec.encode(stored[0])),
            codec.BODY: per_page(mkey, BODY),
            codec.RECIPIENT: per_page(codec.recipient_key(mkey, 0), codec.encode(rcpts[0])),
            codec.DUE: per_page(codec.due_key(env.arrival_time, mkey), b""),
        }
    finally:
        await spool.close()
    assert sizes[codec.BODY] == 2
    stats = table_stats(directory)
    for table, fit in sizes.items():
        entries, leaves = stats[table]["entries"], stats[table]["leaf_pages"]
        assert entries == 400
        # Every leaf page full but the last: with plain puts the bodies took 399 pages.
        assert leaves <= math.ceil(entries / fit) + 1, (table, leaves, entries, fit)
        assert stats[table]["overflow_pages"] == 0


@pytest.mark.asyncio
async def test_keys_out_of_arrival_order_are_stored_in_key_order(tmp_path: Path) -> None:
    spool = Spool.open(str(tmp_path / "spool"), map_size=64 * MB)
    try:
        start = time.time()
        messages = [message(start + i) for i in range(30)]
        for env, rcpts in messages[10:20] + messages[:10][::-1] + messages[20:]:
            await spool.store(env, rcpts, env.id.encode())
        assert [m.envelope.id for m in spool.messages()] == [env.id for env, _ in messages]
        assert all(spool.read_body(env.id) == env.id.encode() for env, _ in messages)
        assert [qid for _, qid in spool.due(start + 100)] == [env.id for env, _ in messages]
        assert spool.recover().corrupt == 0
    finally:
        await spool.close()


def listing(spool: Spool) -> Iterator[str]:
    for m in spool.messages():
        yield m.envelope.id


@pytest.mark.asyncio
async def test_store_and_delete_churn_reuses_pages(tmp_path: Path) -> None:
    spool = Spool.open(str(tmp_path / "spool"), map_size=256 * MB)
    env = spool._tables.env  # the page counts are what this test is about
    try:
        await store_in_groups(spool, 50, 10, time.time())
        # A listing left half-read (an admin client that hung up) must not pin old pages.
        abandoned = listing(spool)
        next(abandoned)
        used: list[int] = []
        for cycle in range(5):
            stored = await store_in_groups(spool, 600, 20, time.time() + cycle)
            await asyncio.gather(*(spool.delete(e.id) for e in stored))
            used.append(env.info()["last_pgno"])
        assert spool.count() == 50
        # After the first cycle the freed pages are reused: the file stops growing.
        assert max(used[1:]) <= used[0] * 1.1 + 16, used
    finally:
        await spool.close()
