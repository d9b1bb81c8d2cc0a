"""Dropping written bodies from the resident set (spool/trim.py) loses nothing.

The figure it is for (RSS with 100,000 queued) is measured in bench/; here: the trimmer finds
the data file's mapping in this process, madvise succeeds, and every body still reads back
byte for byte afterwards, from this thread and from the writer's commits that follow.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import Spool
from mtad.spool.trim import Trimmer, mappings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise trimming is Linux only")


@pytest.mark.asyncio
async def test_trimmed_bodies_read_back_intact(tmp_path: Path) -> None:
    spool = Spool.open(str(tmp_path / "spool"), map_size=256 * 1024**2)
    spool.recover()
    try:
        bodies = {}
        for i in range(200):
            queue_id = new_queue_id()
            body = b"Subject: %d\r\n\r\n" % i + os.urandom(3000).hex().encode() + b"\r\n"
            await spool.store(Envelope(id=queue_id, sender="a@example.test", arrival_time=time.time(),
                                       size=len(body)), [Recipient(address="b@example.test")], body)
            bodies[queue_id] = body
        path = str(tmp_path / "spool" / "data" / "data.mdb")
        assert mappings(path), "the data file is mapped by LMDB in this process"
        trimmer = Trimmer(path, every=1)
        trimmer.after_commit(os.stat(path).st_size)
        assert trimmer.trims == 1
        assert all(spool.read_body(q) == b for q, b in bodies.items())
        # Writes after a trim still land and read back.
        queue_id = new_queue_id()
        await spool.store(Envelope(id=queue_id, sender="", arrival_time=time.time(), size=5),
                          [Recipient(address="c@example.test")], b"x\r\n\r\n")
        assert spool.read_body(queue_id) == b"x\r\n\r\n"
    finally:
        await spool.close()
