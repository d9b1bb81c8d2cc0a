"""Fill an mtad spool with many queued messages, for the RSS and start-up figures with 100,000.

Two ways, same result (N messages of ~1 KB, one recipient each, in the spool mtad will open):
  smtp    through a running mtad with smtp-source (-d, 20 sessions): the real ingest path.
  direct  with mtad's own spool API (`mtad.spool.Spool`), mtad stopped: the records are written
          by the same code the daemon uses, many stores sharing each group commit; ~10x faster.

Trust: none; every byte written here is generated here.
RFCs: RFC 5322 (the generated message is a well-formed one).
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from pathlib import Path

from smtp_source import SENDER, Job, LoadResult, run_smtp_source


def direct_available() -> bool:
    """True when mtad's spool API exists to write the spool without a daemon."""
    try:
        from mtad.spool import Spool
    except ImportError:
        return False
    return hasattr(Spool, "open")


def fill_via_smtp(port: int, count: int, recipient: str, cap: float) -> LoadResult:
    """Send COUNT 1 KB messages through mtad on PORT with smtp-source -d -s 20."""
    return run_smtp_source(Job(sessions=20, messages=count, size=1024, reuse=True), port,
                           recipient, cap)


def sample_message(queue_id: str, recipient: str, now: float) -> bytes:
    """A ~1 KB message as mtad would hold it after ingest: Received header first (pure)."""
    head = (
        f"Received: from bench.source.test (localhost [127.0.0.1])\r\n"
        f"\tby mtad-bench.localdomain with SMTP id {queue_id}\r\n"
        f"\tfor <{recipient}>; {formatdate(now)}\r\n"
        f"Message-ID: <{queue_id}@mtad-bench.localdomain>\r\n"
        f"Date: {formatdate(now)}\r\n"
        f"From: <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: benchmark message {queue_id}\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    return head + line * max(1, (1024 - len(head)) // len(line))


async def _fill_direct(spool_dir: Path, count: int, recipient: str) -> None:
    from mtad.records import Envelope, Recipient, new_queue_id
    from mtad.spool import Spool

    spool = Spool.open(str(spool_dir), map_size=8 * 1024**3, commit_linger=0.002,
                       commit_max_batch=1024)
    try:
        spool.recover()
        done = 0
        while done < count:
            batch = min(1024, count - done)
            stores = []
            now = time.time()
            for _ in range(batch):
                qid = new_queue_id(now)
                body = sample_message(qid, recipient, now)
                env = Envelope(id=qid, sender=SENDER, arrival_time=now, size=len(body),
                               message_id=f"<{qid}@mtad-bench.localdomain>",
                               client_address="127.0.0.1", client_helo="bench.source.test",
                               listener="mx", protocol="SMTP")
                stores.append(spool.store(env, [Recipient(address=recipient)], body))
            await asyncio.gather(*stores)
            done += batch
    finally:
        await spool.close()


def fill_direct(spool_dir: Path, count: int, recipient: str) -> float:
    """Write COUNT messages into the spool at SPOOL_DIR (mtad stopped); return seconds taken."""
    started = time.monotonic()
    asyncio.run(_fill_direct(spool_dir, count, recipient))
    return time.monotonic() - started
