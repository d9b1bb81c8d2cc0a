"""The spool against real LMDB in tmp_path: records, hold/release/delete, the due index,
schema version, recovery of corrupt records, reopening, and a SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import stat
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import lmdb
import pytest
import pytest_asyncio
from structlog.testing import capture_logs
from support import Clock

from mtad.records import Envelope, Recipient, new_queue_id
from mtad.spool import RecoveryReport, Spool, SpoolError, codec
from mtad.spool.writes import hold_recipients

NOW = 1_800_000_000.0



def envelope(queue_id: str | None = None, *, arrival: float = NOW, size: int = 5) -> Envelope:
    return Envelope(id=queue_id or new_queue_id(arrival), sender="alice@example.test",
                    arrival_time=arrival, size=size, message_id="<m@example.test>")


def rcpts(*addresses: str, **fields: object) -> list[Recipient]:
    return [Recipient(address=a, **fields) for a in addresses or ("bob@example.net",)]  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    opened = Spool.open(str(tmp_path / "spool"), map_size=64 * 1024**2, clock=Clock(NOW))
    try:
        yield opened
    finally:
        await opened.close()


def raw_env(directory: Path, table: str = codec.META) -> lmdb.Environment:
    """The LMDB environment holding `table`, opened directly (spool closed), to plant or
    inspect raw records: meta/ for everything but bodies, data/ for bodies."""
    where = codec.DATA_DIR if table in codec.DATA_TABLES else codec.META_DIR
    return lmdb.open(str(directory / where), max_dbs=10, map_size=64 * 1024**2)


def raw_keys(directory: Path, table: str) -> dict[bytes, bytes]:
    env = raw_env(directory, table)
    try:
        db = env.open_db(table.encode())
        with env.begin() as txn:
            return dict(txn.cursor(db=db))
    finally:
        env.close()


@pytest.mark.asyncio
async def test_round_trip(spool: Spool, tmp_path: Path) -> None:
    env = envelope()
    body = b"Subject: hi\r\n\r\n\x00\xff binary is kept\r\n"
    recipients = rcpts("bob@example.net", "carol@example.org", next_attempt=NOW + 60, attempts=1)
    await spool.store(env, recipients, body)
    got = spool.get(env.id)
    assert got is not None
    assert got.envelope == env and got.recipients == recipients
    assert spool.read_body(env.id) == body
    assert spool.count() == 1
    assert [m.envelope.id for m in spool.messages()] == [env.id]
    assert spool.due(NOW + 59) == [] and spool.due(NOW + 60) == [(NOW + 60, env.id)]
    assert spool.get(new_queue_id()) is None and spool.read_body(new_queue_id()) is None
    for directory in (tmp_path / "spool", tmp_path / "spool" / "meta", tmp_path / "spool" / "data"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


@pytest.mark.asyncio
async def test_duplicate_queue_id_is_refused_and_keeps_the_first(spool: Spool) -> None:
    env = envelope()
    await spool.store(env, rcpts(), b"first")
    with pytest.raises(SpoolError):
        await spool.store(env, rcpts("other@example.net"), b"second")
    assert spool.read_body(env.id) == b"first"
    got = spool.get(env.id)
    assert got is not None and [r.address for r in got.recipients] == ["bob@example.net"]


@pytest.mark.asyncio
async def test_messages_pages_through_many_in_order_without_repeats(spool: Spool) -> None:
    ids = [new_queue_id(NOW + i) for i in range(1300)]  # more than two read pages
    for chunk in range(0, len(ids), 100):
        await _store_all(spool, ids[chunk : chunk + 100])
    seen = []
    for index, message in enumerate(spool.messages()):
        seen.append(message.envelope.id)
        if index == 600:  # a delete behind and ahead of the listing while it runs
            await spool.delete(ids[10])
            await spool.delete(ids[1200])
    assert seen == [i for i in ids if i != ids[1200]]
    assert spool.count() == 1298


async def _store_all(spool: Spool, ids: list[str]) -> None:
    await asyncio.gather(*(spool.store(envelope(i), rcpts(), i.encode()) for i in ids))


@pytest.mark.asyncio
async def test_hold_release_delete(tmp_path: Path) -> None:
    clock = Clock(NOW)
    spool = Spool.open(str(tmp_path / "spool"), map_size=64 * 1024**2, clock=clock)
    try:
        env = envelope()
        recipients = [
            Recipient(address="now@example.net"),
            Recipient(address="retry@example.net", attempts=2, next_attempt=NOW + 300),
            Recipient(address="later@example.net", next_attempt=NOW + 900),
        ]
        await spool.store(env, recipients, b"body")
        assert spool.due(NOW) == [(NOW, env.id)]

        assert await spool.set_held(env.id, True) is True
        held = spool.get(env.id)
        assert held is not None and held.envelope.held
        assert {r.state for r in held.recipients} == {"held"}
        assert spool.due(NOW + 10_000) == []  # a held message is never due

        clock.now = NOW + 600  # the retry time has passed, the scheduled one not yet
        assert await spool.set_held(env.id, False) is True
        released = spool.get(env.id)
        assert released is not None and not released.envelope.held
        assert [r.state for r in released.recipients] == ["queued", "queued", "scheduled"]
        assert spool.due(NOW) == [(NOW, env.id)]

        assert await spool.delete(env.id) is True
        assert spool.get(env.id) is None and spool.read_body(env.id) is None
        assert spool.count() == 0 and spool.due(NOW + 10_000) == []
        assert await spool.delete(env.id) is False
        assert await spool.set_held(env.id, True) is False
    finally:
        await spool.close()
    for table in ("envelope", "body", "recipient", "due"):
        assert raw_keys(tmp_path / "spool", table) == {}, table


def test_release_state_decisions() -> None:
    held = [
        Recipient(address="a", state="held"),
        Recipient(address="b", state="held", attempts=1, next_attempt=NOW + 1),
        Recipient(address="c", state="held", next_attempt=NOW + 1),
        Recipient(address="d", state="held", attempts=3, next_attempt=NOW),
    ]
    assert [r.state for r in hold_recipients(held, False, NOW)] == ["queued", "deferred", "scheduled", "queued"]
    assert [r.state for r in hold_recipients(held, True, NOW)] == ["held"] * 4
    active = [Recipient(address="e", state="active")]
    assert hold_recipients(active, False, NOW) == active  # release leaves unheld recipients alone


@pytest.mark.asyncio
async def test_update_recipients_moves_due_and_empty_removes(spool: Spool, tmp_path: Path) -> None:
    env = envelope()
    await spool.store(env, rcpts("a@example.net", "b@example.net", "c@example.net"), b"body")
    later = [Recipient(address="c@example.net", state="deferred", attempts=1, next_attempt=NOW + 120)]
    assert await spool.update_recipients(env.id, later) is True
    got = spool.get(env.id)
    assert got is not None and got.recipients == later
    assert spool.due(NOW + 119) == [] and spool.due(NOW + 120) == [(NOW + 120, env.id)]
    assert await spool.update_recipients(env.id, []) is True
    assert spool.get(env.id) is None and spool.read_body(env.id) is None and spool.due(NOW + 999) == []
    assert await spool.update_recipients(env.id, later) is False


@pytest.mark.asyncio
async def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    spool = Spool.open(directory, map_size=64 * 1024**2)
    ids = [new_queue_id(NOW + i) for i in range(50)]
    await _store_all(spool, ids)
    await spool.set_held(ids[3], True)
    await spool.delete(ids[4])
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.store(envelope(), rcpts(), b"x")
    with pytest.raises(SpoolError):
        spool.count()

    spool = Spool.open(directory, map_size=64 * 1024**2)
    try:
        report = spool.recover()
        assert isinstance(report, RecoveryReport)
        assert (report.messages, report.recipients, report.corrupt) == (49, 49, 0)
        assert [m.envelope.id for m in spool.messages()] == [i for i in ids if i != ids[4]]
        assert all(spool.read_body(i) == i.encode() for i in ids if i != ids[4])
        held = spool.get(ids[3])
        assert held is not None and held.envelope.held
    finally:
        await spool.close()


@pytest.mark.asyncio
async def test_one_process_per_spool(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="in use"):
        Spool.open(spool.directory)


@pytest.mark.asyncio
async def test_schema_version(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    await Spool.open(str(directory)).close()
    assert raw_keys(directory, "meta") == {b"schema": b"2"}
    for version, message in ((b"3", "schema version 3"), (b"one", "unreadable schema version")):
        env = raw_env(directory)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"schema", version, db=meta)
        env.close()
        with pytest.raises(SpoolError, match=message):
            Spool.open(str(directory))
    # The refusal left the spool alone and released it.
    assert raw_keys(directory, "meta") == {b"schema": b"one"}


def test_version_1_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    old = lmdb.open(str(directory), max_dbs=10, map_size=1024**2)  # data.mdb right in spool_dir
    with old.begin(write=True) as txn:
        txn.put(b"schema", b"1", db=old.open_db(b"meta", txn=txn))
    old.close()
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(SpoolError, match="version-1 spool.*no release used version 1"):
        Spool.open(str(directory))
    # Nothing created or changed but the lock file (which a version-1 spool had as well).
    assert sorted(p.name for p in directory.iterdir() if p.name != "mtad-spool.lock") == before
    # The lock was released: a second try gets the same answer, not "in use".
    with pytest.raises(SpoolError, match="version-1 spool"):
        Spool.open(str(directory))


def test_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError, match="file"):
        Spool.open(str(tmp_path / "file"))


@pytest.mark.asyncio
async def test_recover_moves_corrupt_records_aside_and_goes_on(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool.open(str(directory), map_size=64 * 1024**2)
    good, bad_env, bad_rcpt, lonely, partly = (new_queue_id(NOW + i) for i in range(5))
    await _store_all(spool, [good, bad_env, bad_rcpt, lonely])
    await spool.store(envelope(partly), rcpts("x@example.net", "y@example.net"), b"partly")
    await spool.close()

    env = raw_env(directory)
    tables = {name: env.open_db(name.encode()) for name in codec.META_TABLES}
    orphan = new_queue_id(NOW + 10)
    data = raw_env(directory, codec.BODY)
    with data.begin(write=True) as txn:
        txn.put(orphan.encode(), b"orphan body", db=data.open_db(b"body", txn=txn))
    data.close()
    with env.begin(write=True) as txn:
        txn.put(bad_env.encode(), b"\xc1 not msgpack", db=tables["envelope"])
        txn.put(codec.recipient_key(bad_rcpt.encode(), 0), b"\x93\x01\x02", db=tables["recipient"])
        txn.delete(codec.recipient_key(lonely.encode(), 0), db=tables["recipient"])
        txn.put(codec.recipient_key(partly.encode(), 1), b"garbage", db=tables["recipient"])
        txn.put(codec.recipient_key(orphan.encode(), 0), codec.encode(Recipient(address="o@x")),
                db=tables["recipient"])
        txn.put(codec.due_key(NOW + 5, b"gone"), b"", db=tables["due"])
        txn.delete(codec.due_key(NOW, good.encode()), db=tables["due"])
    env.close()

    spool = Spool.open(str(directory), map_size=64 * 1024**2)
    try:
        with capture_logs() as logs:
            report = spool.recover()
        assert (report.messages, report.recipients) == (2, 2)  # good, and partly with one recipient
        corrupt_logs = {(e["table"], e["key"]) for e in logs if e["event"] == "spool.corrupt"}
        assert corrupt_logs == {
            ("envelope", bad_env), ("recipient", f"{bad_env}#0"), ("body", bad_env),
            ("recipient", f"{bad_rcpt}#0"), ("envelope", bad_rcpt), ("body", bad_rcpt),
            ("envelope", lonely), ("body", lonely),
            ("recipient", f"{partly}#1"),
            ("recipient", f"{orphan}#0"),
        }
        assert report.corrupt == len(corrupt_logs)
        # A body without an envelope was never acknowledged (or is no longer queued): deleted.
        orphans = [e for e in logs if e["event"] == "spool.orphan_bodies_deleted"]
        assert [(e["count"], e["keys"]) for e in orphans] == [(1, [orphan])]
        assert report.orphan_bodies == 1
        assert any(e["event"] == "spool.due_index_rebuilt" for e in logs)
        assert [m.envelope.id for m in spool.messages()] == [good, partly]
        assert spool.due(NOW + 100) == [(NOW, good), (NOW, partly)]
        # The partly corrupt message goes on with its good recipient; updating it is clean.
        assert await spool.update_recipients(partly, rcpts("x@example.net", "z@example.net"))
        again = spool.recover()
        assert (again.messages, again.recipients, again.corrupt) == (2, 3, 0)
        await spool.delete(bad_env)  # gone from the queue already: nothing happens
    finally:
        await spool.close()
    corrupt = raw_keys(directory, "corrupt")
    assert corrupt[b"envelope\x00" + bad_env.encode()] == b"\xc1 not msgpack"
    assert corrupt[b"body\x00" + bad_env.encode()] == bad_env.encode()  # moved with its envelope
    assert len(corrupt) == report.corrupt
    # Bodies of the envelopes moved aside left the body table; good and partly kept theirs.
    assert set(raw_keys(directory, "body")) == {good.encode(), partly.encode()}


CHILD = textwrap.dedent(
    """
    import asyncio, sys, threading, time
    from mtad.records import Envelope, Recipient, new_queue_id
    from mtad.spool import Spool
    from mtad.spool.env import open_tables
    from mtad.spool.writer import Writer

    class PausingTxn:
        def __init__(self, txn, env):
            self._txn, self._env = txn, env
        def __getattr__(self, name):
            return getattr(self._txn, name)
        def commit(self):
            if self._env.commits == self._env.pause_after:
                # The batch's bodies are committed in data/; its envelopes never will be.
                sys.stdout.write("PAUSED\\n")
                sys.stdout.flush()
                threading.Event().wait()
            self._txn.commit()
            self._env.commits += 1

    class PausingMeta:
        def __init__(self, env, pause_after):
            self._env, self.pause_after, self.commits = env, pause_after, 0
        def begin(self, *, write):
            return PausingTxn(self._env.begin(write=write), self)

    async def producer(spool):
        while True:
            qid = new_queue_id()
            env = Envelope(id=qid, sender="s@example.test", arrival_time=time.time(), size=300)
            await spool.store(env, [Recipient(address="r@example.net")], qid.encode() * 10)
            sys.stdout.write(qid + "\\n")
            sys.stdout.flush()

    async def main():
        pause_after = int(sys.argv[2])
        if pause_after < 0:
            spool = Spool.open(sys.argv[1], map_size=256 * 1024**2, commit_linger=0.001)
        else:
            tables = open_tables(sys.argv[1], map_size=256 * 1024**2)
            writer = Writer(PausingMeta(tables.env, pause_after), tables.data_env, tables.body,
                            linger=0.001, max_batch=256)
            writer.start()
            spool = Spool(tables, writer, time.time)
        await asyncio.gather(*(producer(spool) for _ in range(20)))

    asyncio.run(main())
    """
)


async def run_child_until_killed(directory: str, pause_after: int, acks: int) -> list[str]:
    """Run CHILD (20 producers) and SIGKILL it after `acks` acknowledged stores, or, with
    pause_after >= 0, once its writer sits between a batch's data and meta commits.
    Returns the queue ids it acknowledged."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, directory, str(pause_after),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    try:
        while pause_after >= 0 or len(acknowledged) < acks:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            if not line or line == b"PAUSED\n":
                break
            acknowledged.append(line.decode().strip())
        child.send_signal(signal.SIGKILL)
        rest, errors = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL, errors.decode()
    # Lines the child finished writing before it died were acknowledged too; a torn last one not.
    acknowledged += [line.decode() for line in rest.split(b"\n")[:-1] if line != b"PAUSED"]
    return acknowledged


def check_after_crash(directory: str, acknowledged: list[str]) -> RecoveryReport:
    """Every acknowledged message is whole; no envelope is left without its body; after
    recover() the body table holds exactly the queued messages' bodies."""
    async def check() -> RecoveryReport:
        spool = Spool.open(directory, map_size=256 * 1024**2)
        try:
            with capture_logs() as logs:
                report = spool.recover()
            assert report.corrupt == 0 and report.messages >= len(acknowledged)
            for queue_id in acknowledged:
                assert spool.read_body(queue_id) == queue_id.encode() * 10, queue_id
                message = spool.get(queue_id)
                assert message is not None and message.recipients[0].address == "r@example.net"
            queued = [m.envelope.id for m in spool.messages()]
            assert all(spool.read_body(queue_id) is not None for queue_id in queued)
            orphans = [e for e in logs if e["event"] == "spool.orphan_bodies_deleted"]
            assert sum(e["count"] for e in orphans) == report.orphan_bodies
            assert not set(queued) & {key for e in orphans for key in e["keys"]}
            again = spool.recover()
            assert (again.messages, again.corrupt, again.orphan_bodies) == (len(queued), 0, 0)
        finally:
            await spool.close()
        bodies = raw_keys(Path(directory), codec.BODY)
        assert sorted(key.decode() for key in bodies) == queued
        return report

    return asyncio.run(check())


@pytest.mark.asyncio
async def test_sigkill_mid_stream_keeps_every_acknowledged_store(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    # A random moment: sometimes inside a commit, sometimes between a batch's two commits.
    acknowledged = await run_child_until_killed(directory, -1, random.randint(500, 1500))
    assert len(acknowledged) >= 500
    await asyncio.to_thread(check_after_crash, directory, acknowledged)


@pytest.mark.asyncio
async def test_sigkill_between_data_and_meta_commits_leaves_only_orphan_bodies(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    acknowledged = await run_child_until_killed(directory, random.randint(20, 60), 0)
    assert acknowledged
    data = raw_keys(Path(directory), codec.BODY)
    envelopes = raw_keys(Path(directory), codec.ENVELOPE)
    assert set(envelopes) < set(data)  # the paused batch's bodies, without envelopes
    report = await asyncio.to_thread(check_after_crash, directory, acknowledged)
    assert report.orphan_bodies == len(data) - len(envelopes) > 0
