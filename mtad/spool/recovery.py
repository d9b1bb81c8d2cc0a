"""recover(): one pass over the spool at start, moving records that fail to decode aside.

A record that fails to decode, an envelope with no (decodable) recipients, recipients with no
envelope, and an envelope whose body is missing move to the `corrupt` table, raw bytes
untouched (a moved envelope's body goes with it), and are logged one line each
("spool.corrupt", with table, key and reason). Nothing of an acknowledged message is dropped
and nothing here raises for a bad record. Two kinds of leftover are removed instead: due-index
entries that disagree with the messages (derived data, rebuilt), and bodies without an envelope
(orphans: a crash between a batch's data and meta commits, or between a removal's meta commit
and its body's deletion; never acknowledged or no longer queued), deleted and logged in one
"spool.orphan_bodies_deleted" line with their count and queue ids.

The envelope and recipient tables are walked side by side; the body table (the bulk of the
spool, in its own environment) is not touched unless its entry count differs from the
envelope table's, and then only its keys are walked.

The scan and the repairs run as one operation of the writer thread, in its write transactions,
so no store can slip between what was seen and what is changed.

Trust: the records were written by us, but a machine crash, a disk or an operator may have
damaged them; decoding is strict (msgspec with the record types).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import lmdb
import msgspec
import structlog

from mtad.records import Recipient

from . import codec, writes
from .env import Tables
from .errors import CorruptRecord, SpoolFull
from .writer import Writer, WriteTxns

log = structlog.get_logger("mtad.spool")

if TYPE_CHECKING:
    Txn: TypeAlias = lmdb.Transaction[bytes]

_LOGGED_KEYS = 1000
"""Most orphan queue ids one log line names (the count is always exact)."""


class RecoveryReport(msgspec.Struct, frozen=True, kw_only=True):
    messages: int
    """Messages queued after recovery."""
    recipients: int
    corrupt: int
    """Records moved to the corrupt table by this recovery."""
    seconds: float
    orphan_bodies: int = 0
    """Bodies without an envelope deleted by this recovery."""


@dataclass
class Findings:
    messages: int = 0
    recipients: int = 0
    moves: list[tuple[str, bytes, str]] = field(default_factory=list)
    """(table, key, reason) of every record to move to `corrupt`."""
    orphan_bodies: list[bytes] = field(default_factory=list)
    stale_due: list[bytes] = field(default_factory=list)
    missing_due: list[bytes] = field(default_factory=list)


def recover(tables: Tables, writer: Writer) -> RecoveryReport:
    started = time.monotonic()
    try:
        findings = writer.run_blocking(functools.partial(_scan_and_repair, tables))
        moved, deleted = len(findings.moves), len(findings.orphan_bodies)
    except SpoolFull:
        # No room even to move records aside: report what is there and leave it in place.
        log.error("spool.recover_incomplete", reason="spool map is full")
        with tables.env.begin() as meta, tables.data_env.begin() as data:
            findings = scan(meta, data, tables)
        moved = deleted = 0
    for table, key, reason in findings.moves:
        log.warning("spool.corrupt", table=table, key=codec.describe_key(table, key), reason=reason)
    if deleted:
        log.warning("spool.orphan_bodies_deleted", count=deleted,
                    keys=[codec.queue_id_of(key) for key in findings.orphan_bodies[:_LOGGED_KEYS]])
    if findings.stale_due or findings.missing_due:
        log.warning("spool.due_index_rebuilt", stale=len(findings.stale_due), missing=len(findings.missing_due))
    return RecoveryReport(
        messages=findings.messages,
        recipients=findings.recipients,
        corrupt=moved,
        orphan_bodies=deleted,
        seconds=time.monotonic() - started,
    )


def _scan_and_repair(tables: Tables, txns: WriteTxns) -> Findings:
    findings = scan(txns.meta, txns.data, tables)
    writes.delete_orphan_bodies(tables, findings.orphan_bodies, txns)
    writes.move_to_corrupt(tables, [(table, key) for table, key, _ in findings.moves], txns)
    writes.fix_due(tables, findings.stale_due, findings.missing_due, txns.meta)
    return findings


def scan(meta: Txn, data: Txn, tables: Tables) -> Findings:
    """Walk envelopes and recipients side by side (both sorted by queue id); change nothing.

    `data` (a transaction of the data environment) is used for the body table's entry count
    and, only when that differs from the envelope count, for a walk of the body keys.
    """
    found = Findings()
    moves = found.moves
    expected_due: set[bytes] = set()
    # Each envelope has exactly one body unless something went wrong; only then pay for
    # walking the body table's keys (whose leaf pages hold the bodies).
    check_bodies = data.stat(tables.body)["entries"] != meta.stat(tables.envelope)["entries"]
    body_keys: Iterator[bytes] = (data.cursor(db=tables.body).iternext(keys=True, values=False)
                                  if check_bodies else iter(()))
    body_key = next(body_keys, None)

    recipient_rows = meta.cursor(db=tables.recipient).iternext(keys=True, values=True)
    row = next(recipient_rows, None)
    for mkey, raw in meta.cursor(db=tables.envelope).iternext(keys=True, values=True):
        recipients: list[Recipient] = []
        recipient_keys: list[bytes] = []
        while row is not None:
            rkey, rvalue = row
            owner = codec.recipient_owner(rkey)
            if owner is not None and owner > mkey:
                break
            if owner is None or owner < mkey:
                moves.append((codec.RECIPIENT, rkey, "no envelope" if owner else "malformed key"))
            else:
                try:
                    recipients.append(codec.decode_recipient(rvalue))
                    recipient_keys.append(rkey)
                except CorruptRecord:
                    moves.append((codec.RECIPIENT, rkey, "fails to decode"))
            row = next(recipient_rows, None)

        has_body = True
        if check_bodies:
            while body_key is not None and body_key < mkey:
                found.orphan_bodies.append(body_key)
                body_key = next(body_keys, None)
            has_body = body_key == mkey
            if has_body:
                body_key = next(body_keys, None)

        reason = ""
        try:
            envelope = codec.decode_envelope(raw)
            if envelope.id != codec.queue_id_of(mkey):
                reason = "envelope id differs from its key"
            elif not recipients:
                reason = "no recipients"
            elif not has_body:
                reason = "no body"
        except CorruptRecord:
            reason = "fails to decode"
        if reason:
            moves.append((codec.ENVELOPE, mkey, reason))
            moves.extend((codec.RECIPIENT, key, "envelope moved to corrupt") for key in recipient_keys)
            if has_body:
                moves.append((codec.BODY, mkey, "envelope moved to corrupt"))
            continue
        found.messages += 1
        found.recipients += len(recipients)
        due = codec.message_due_key(envelope, recipients, mkey)
        if due is not None:
            expected_due.add(due)

    while row is not None:
        owner = codec.recipient_owner(row[0])
        moves.append((codec.RECIPIENT, row[0], "no envelope" if owner else "malformed key"))
        row = next(recipient_rows, None)
    while body_key is not None:
        found.orphan_bodies.append(body_key)
        body_key = next(body_keys, None)

    for dkey in meta.cursor(db=tables.due).iternext(keys=True, values=False):
        if dkey in expected_due:
            expected_due.discard(dkey)
        else:
            found.stale_due.append(dkey)
    found.missing_due = sorted(expected_due)
    return found
