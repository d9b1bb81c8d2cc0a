"""Bounces and complaints: parse DSNs, non-standard bounces, ARF reports and auto-replies.

Pure core (no asyncio, no I/O). `parse(bytes) -> list[DsnRecord]` reads any message;
`classify_reply(code, status, text) -> (reason, class)` gives synchronous SMTP replies the
same vocabulary (sisimai v5 reason names; hard/soft/complaint/auto-reply/unknown).
"""

from mtad.dsn.classify import classify_reply
from mtad.dsn.parse import parse
from mtad.dsn.record import DsnRecord

__all__ = ["DsnRecord", "classify_reply", "parse"]
