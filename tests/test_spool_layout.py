"""How the spool uses its files: bodies in data/, everything else in meta/, so the meta file
stays small however big the bodies are and walking the queue maps no body page; tables stay
densely packed for stores in arrival order; keys out of order still land where they belong;
store/delete churn reuses freed pages instead of growing either file (no read transaction left
open pins old pages). Real LMDB in tmp_path; the assertions are on LMDB's own page counts and
on which file's pages the process mapped, never on timings."""

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
    stats: dict[str, Any] = {}
    for where, names in ((codec.META_DIR, (codec.ENVELOPE, codec.RECIPIENT, codec.DUE)),
                         (codec.DATA_DIR, (codec.BODY,))):
        env = lmdb.open(str(directory / where), max_dbs=10, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                stats.update({name: txn.stat(env.open_db(name.encode(), txn=txn, create=False))
                              for name in names})
        finally:
            env.close()
    return stats


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
    envs = (spool._tables.env, spool._tables.data_env)  # the page counts are what this test is about
    try:
        await store_in_groups(spool, 50, 10, time.time())
        # A listing left half-read (an admin client that hung up) must not pin old pages.
        abandoned = listing(spool)
        next(abandoned)
        used: list[tuple[int, int]] = []
        for cycle in range(5):
            stored = await store_in_groups(spool, 600, 20, time.time() + cycle)
            await asyncio.gather(*(spool.delete(e.id) for e in stored))
            used.append(tuple(env.info()["last_pgno"] for env in envs))  # type: ignore[arg-type]
        assert spool.count() == 50
        # After the first cycles the freed pages are reused: neither file keeps growing. (The
        # bodies of a cycle's deletes may leave in the data transaction of the next cycle's
        # first stores, and LMDB reuses pages a transaction frees only two transactions later,
        # so the data file takes one step more than the meta file before it levels off.)
        for which in (0, 1):
            pages = [u[which] for u in used]
            assert pages[1] <= pages[0] * 1.25 + 16, (which, used)
            assert max(pages[2:]) <= pages[1] + 16, (which, used)
    finally:
        await spool.close()


def mapped_kb(path: Path) -> int:
    """Resident KB of this process's mappings of `path` (/proc/self/smaps): pages touched
    through LMDB's map, plus whatever the kernel's fault-around mapped next to them."""
    total, inside = 0, False
    target = str(path.resolve())
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


BIG = 20 * 1024
"""A 20 KB body: overflow pages of its own, the shape that made the one-file spool's RSS follow
the message volume."""


@pytest.mark.asyncio
async def test_bodies_stay_out_of_the_meta_file_and_out_of_a_queue_walk(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    count = 300
    spool = Spool.open(str(directory), map_size=64 * MB)
    try:
        start = time.time()
        for first in range(0, count, 50):
            batch = [message(start + (first + i) / 1000) for i in range(50)]
            await asyncio.gather(*(spool.store(env, rcpts, bytes([i % 256]) * BIG)
                                   for i, (env, rcpts) in enumerate(batch)))
    finally:
        await spool.close()
    meta_file, data_file = directory / codec.META_DIR / "data.mdb", directory / codec.DATA_DIR / "data.mdb"
    stats = table_stats(directory)
    assert stats[codec.BODY]["overflow_pages"] >= count * BIG // 4096
    assert data_file.stat().st_size >= count * BIG
    # The meta file holds ~0.45 KB a message whatever the bodies weigh (plus LMDB's own pages).
    assert meta_file.stat().st_size <= count * 1024 + 64 * 4096, meta_file.stat().st_size

    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs /proc/self/smaps to see which pages are mapped")
    # Fresh mappings: start-up recovery and a full listing touch the meta file only. (A few
    # pages at the head of data.mdb are read for the body table's entry count.)
    spool = Spool.open(str(directory), map_size=64 * MB)
    try:
        assert spool.recover().messages == count
        assert sum(1 for _ in spool.messages()) == count
        assert all(m.recipients for m in spool.messages())
        meta_kb, data_kb = mapped_kb(meta_file), mapped_kb(data_file)
        assert meta_kb > 0, "the walk should have mapped meta pages"
        assert data_kb <= 256, (data_kb, data_file.stat().st_size // 1024)
        last = list(spool.messages())[-1].envelope.id
        assert spool.read_body(last) == bytes([49]) * BIG
        assert mapped_kb(data_file) >= data_kb + BIG // 1024  # reading a body does map data pages
    finally:
        await spool.close()
