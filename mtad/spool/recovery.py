"""recover(): one pass over the spool at start, moving records that fail to decode aside.

A record that fails to decode, an envelope with no (decodable) recipients, recipients with no
envelope, and a body or envelope missing its partner all move to the `corrupt` table, raw
bytes untouched, and are logged one line each ("spool.corrupt", with table, key and reason).
Nothing is dropped and nothing here raises for a bad record. The due index is derived data:
entries that disagree with the messages are rebuilt.

The scan and the moves run as one operation of the writer thread, in one write transaction,
so no store can slip between what was seen and what is changed.

Trust: the records were written by us, but a machine crash, a disk or an operator may have
damaged them; decoding is strict (msgspec with the record types).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import lmdb
import msgspec
import structlog

from mtad.records import Recipient

from . import codec, writes
from .env import Tables
from .errors import CorruptRecord, SpoolFull
from .writer import Writer

log = structlog.get_logger("mtad.spool")

if TYPE_CHECKING:
    Txn: TypeAlias = lmdb.Transaction[bytes]


class RecoveryReport(msgspec.Struct, frozen=True, kw_only=True):
    messages: int
    """Messages queued after recovery."""
    recipients: int
    corrupt: int
    """Records moved to the corrupt table by this recovery."""
    seconds: float


@dataclass
class Findings:
    messages: int = 0
    recipients: int = 0
    moves: list[tuple[str, bytes, str]] = field(default_factory=list)
    """(table, key, reason) of every record to move to `corrupt`."""
    stale_due: list[bytes] = field(default_factory=list)
    missing_due: list[bytes] = field(default_factory=list)


def recover(tables: Tables, writer: Writer) -> RecoveryReport:
    started = time.monotonic()
    try:
        findings = writer.run_blocking(functools.partial(_scan_and_repair, tables))
        moved = len(findings.moves)
    except SpoolFull:
        # No room even to move records aside: report what is there and leave it in place.
        log.error("spool.recover_incomplete", reason="spool map is full")
        with tables.env.begin() as txn:
            findings = scan(txn, tables)
        moved = 0
    for table, key, reason in findings.moves:
        log.warning("spool.corrupt", table=table, key=codec.describe_key(table, key), reason=reason)
    if findings.stale_due or findings.missing_due:
        log.warning("spool.due_index_rebuilt", stale=len(findings.stale_due), missing=len(findings.missing_due))
    return RecoveryReport(
        messages=findings.messages,
        recipients=findings.recipients,
        corrupt=moved,
        seconds=time.monotonic() - started,
    )


def _scan_and_repair(tables: Tables, txn: Txn) -> Findings:
    findings = scan(txn, tables)
    writes.move_to_corrupt(tables, [(table, key) for table, key, _ in findings.moves], txn)
    writes.fix_due(tables, findings.stale_due, findings.missing_due, txn)
    return findings


def scan(txn: Txn, tables: Tables) -> Findings:
    """Walk envelopes and recipients side by side (both sorted by queue id); change nothing."""
    found = Findings()
    moves = found.moves
    expected_due: set[bytes] = set()
    # Each envelope has exactly one body unless something went wrong; only then pay for
    # looking at the body table (whose pages are most of the spool).
    check_bodies = txn.stat(tables.body)["entries"] != txn.stat(tables.envelope)["entries"]
    body_cursor = txn.cursor(db=tables.body)

    recipient_rows = txn.cursor(db=tables.recipient).iternext(keys=True, values=True)
    row = next(recipient_rows, None)
    for mkey, raw in txn.cursor(db=tables.envelope).iternext(keys=True, values=True):
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

        reason = ""
        try:
            envelope = codec.decode_envelope(raw)
            if envelope.id != codec.queue_id_of(mkey):
                reason = "envelope id differs from its key"
            elif not recipients:
                reason = "no recipients"
            elif check_bodies and not body_cursor.set_key(mkey):
                reason = "no body"
        except CorruptRecord:
            reason = "fails to decode"
        if reason:
            moves.append((codec.ENVELOPE, mkey, reason))
            moves.extend((codec.RECIPIENT, key, "envelope moved to corrupt") for key in recipient_keys)
            if reason != "no body":
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

    if check_bodies:
        moved_envelopes = {key for table, key, _ in moves if table == codec.ENVELOPE}
        for bkey in txn.cursor(db=tables.body).iternext(keys=True, values=False):
            if bkey in moved_envelopes:
                continue  # moved with its envelope
            if txn.get(bkey, db=tables.envelope) is None:
                moves.append((codec.BODY, bkey, "no envelope"))

    for dkey in txn.cursor(db=tables.due).iternext(keys=True, values=False):
        if dkey in expected_due:
            expected_due.discard(dkey)
        else:
            found.stale_due.append(dkey)
    found.missing_due = sorted(expected_due)
    return found
