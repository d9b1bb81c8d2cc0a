"""The spool's on-disk layout: table names, key formats and record encoding.

Pure: no I/O. Everything that decides which bytes go under which key lives here, so that
spool/README.md (the operator's description of the format) has one place to agree with.

Two LMDB environments in the spool directory, so that the small tables every scan walks do
not share a file (and the kernel's fault-around) with the bodies:

    meta/ (META_DIR)
    meta       b"schema" -> ASCII decimal schema version
    envelope   queue id -> msgpack Envelope
    recipient  queue id + b"\\x00" + 4-byte big-endian index -> msgpack Recipient
    due        8-byte big-endian microseconds + queue id -> b""   (when each message is next due)
    corrupt    table name + b"\\x00" + original key -> the raw bytes that failed to decode
    data/ (DATA_DIR)
    body       queue id -> message bytes, as received (plus the headers we added)

Queue ids are ASCII (22 lowercase hex digits from records.new_queue_id), so the envelope,
body and recipient tables all sort by arrival and a message's recipients are one key range.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import msgspec

from mtad.records import Envelope, Recipient

from .errors import CorruptRecord

SCHEMA_VERSION = 2
"""2: meta/ and data/ environments. 1 (one data.mdb in the spool directory) was never released."""
SCHEMA_KEY = b"schema"
META_DIR = "meta"
DATA_DIR = "data"
V1_FILE = "data.mdb"
"""The LMDB file a version-1 spool kept directly in the spool directory."""

META = "meta"
ENVELOPE = "envelope"
BODY = "body"
RECIPIENT = "recipient"
DUE = "due"
CORRUPT = "corrupt"
META_TABLES = (META, ENVELOPE, RECIPIENT, DUE, CORRUPT)
DATA_TABLES = (BODY,)
TABLES = META_TABLES + DATA_TABLES

_SEP = b"\x00"
_INDEX_BYTES = 4
_RECIPIENT_SUFFIX = len(_SEP) + _INDEX_BYTES
_DUE = struct.Struct(">Q")
MAX_QUEUE_ID = 64

# msgspec encoders and decoders never release the GIL while working, so one instance may be
# shared by the event loop thread and the writer thread.
_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_recipient_decoder = msgspec.msgpack.Decoder(Recipient)


def message_key(queue_id: str) -> bytes:
    """The key of a message in the envelope and body tables (and its recipients' prefix)."""
    if not 0 < len(queue_id) <= MAX_QUEUE_ID or not queue_id.isascii() or not queue_id.isprintable():
        raise ValueError(f"not a queue id: {queue_id!r}")
    return queue_id.encode("ascii")


def queue_id_of(key: bytes) -> str:
    return key.decode("ascii", "backslashreplace")


def recipient_prefix(mkey: bytes) -> bytes:
    """Every recipient key of the message starts with this; nothing else does."""
    return mkey + _SEP


def recipient_key(mkey: bytes, index: int) -> bytes:
    return mkey + _SEP + index.to_bytes(_INDEX_BYTES, "big")


def recipient_owner(key: bytes) -> bytes | None:
    """The message key a recipient key belongs to, or None for a malformed key."""
    if len(key) <= _RECIPIENT_SUFFIX or key[-_RECIPIENT_SUFFIX] != 0:
        return None
    return key[:-_RECIPIENT_SUFFIX]


def due_key(due: float, mkey: bytes) -> bytes:
    """Big-endian microseconds first, so a cursor walks the index in due order."""
    return _DUE.pack(max(0, int(due * 1_000_000))) + mkey


def resume_key(due: float, queue_id: str) -> bytes:
    """The due-index key that split_due_key() turned into (due, queue_id), exactly."""
    return _DUE.pack(round(due * 1_000_000)) + message_key(queue_id)


def split_due_key(key: bytes) -> tuple[float, str]:
    (micros,) = _DUE.unpack_from(key)
    return micros / 1_000_000, queue_id_of(key[_DUE.size :])


def corrupt_key(table: str, key: bytes) -> bytes:
    return table.encode("ascii") + _SEP + key


def describe_key(table: str, key: bytes) -> str:
    """A key as an operator reads it in a log line: "<queue id>" or "<queue id>#<index>"."""
    if table == RECIPIENT:
        owner = recipient_owner(key)
        if owner is not None:
            return f"{queue_id_of(owner)}#{int.from_bytes(key[-_INDEX_BYTES:], 'big')}"
    if table == DUE and len(key) > _DUE.size:
        due, queue_id = split_due_key(key)
        return f"{queue_id}@{due:.6f}"
    return queue_id_of(key)


def due_time(envelope: Envelope, recipients: Iterable[Recipient]) -> float | None:
    """When the message is next due for an attempt, or None when nothing of it is due.

    A held message, and held recipients, are never due. A recipient's next_attempt of 0 means
    "as soon as possible", which the index records as the arrival time so that the oldest mail
    comes first.
    """
    if envelope.held:
        return None
    times = [r.next_attempt or envelope.arrival_time for r in recipients if r.state != "held"]
    return min(times) if times else None


def message_due_key(envelope: Envelope, recipients: Iterable[Recipient], mkey: bytes) -> bytes | None:
    due = due_time(envelope, recipients)
    return None if due is None else due_key(due, mkey)


def encode(record: Envelope | Recipient) -> bytes:
    return _encoder.encode(record)


def decode_envelope(value: bytes) -> Envelope:
    try:
        return _envelope_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise CorruptRecord(f"envelope fails to decode: {exc}") from None


def decode_recipient(value: bytes) -> Recipient:
    try:
        return _recipient_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise CorruptRecord(f"recipient fails to decode: {exc}") from None
