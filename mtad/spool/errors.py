"""The spool's exception tree: what a caller may catch, by cause.

The receiving side maps these once, at its edge, to bland replies: SpoolFull -> 452 4.3.1,
SpoolFailed -> 451 4.3.0 (HTTP 503 for both). The text of these exceptions is for logs and
operators only; it never reaches an SMTP peer or HTTP client.
"""

from __future__ import annotations


class SpoolError(Exception):
    """The spool cannot do what was asked (closed, unusable directory, newer schema...)."""


class SpoolFull(SpoolError):
    """The LMDB map is full: nothing of the write was stored."""


class SpoolFailed(SpoolError):
    """An I/O or LMDB error failed the commit: nothing of the write was stored."""


class CorruptRecord(SpoolError):
    """A stored record failed to decode (recover() moves such records to `corrupt`)."""
