"""The SMTP client's pure protocol pieces: reply lines, EHLO keywords, commands, dot-stuffing.

No I/O: client.py's SmtpConnection does the talking. Everything a server sends is hostile and
parsed strictly here; every command line we build refuses values that could break out of it.
RFCs: 5321 (4.1.1 commands, 4.2 replies, 4.5.2 transparency), 1870 (SIZE), 6152 (8BITMIME),
6531 (SMTPUTF8), 3461 4 (DSN parameters, xtext).
"""

from __future__ import annotations

from mtad.deliver.outcome import Outcome, local
from mtad.records import Envelope, Recipient


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """(code, more lines follow, text) of one reply line; ValueError when it is not one."""
    line = line.rstrip(b"\r\n")
    sep = line[3:4]
    if len(line) < 3 or not line[:3].isdigit() or sep not in (b"", b" ", b"-"):
        raise ValueError("malformed reply line")
    code = int(line[:3])
    if not 200 <= code <= 599:
        raise ValueError("reply code out of range")
    return code, sep == b"-", line[4:].decode("utf-8", "replace").strip()


def parse_ehlo(lines: list[str]) -> dict[str, str]:
    """Extensions of an EHLO reply (keyword upper-cased -> parameters); line 1 is the greeting."""
    extensions: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _, params = line.partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def size_limit(extensions: dict[str, str]) -> int:
    """The server's RFC 1870 SIZE limit in bytes; 0 when none is declared."""
    value = extensions.get("SIZE", "")
    return int(value) if value.isdigit() else 0


def dot_stuff(body: bytes) -> bytes:
    """The DATA stream of a CRLF body: leading dots doubled (RFC 5321 4.5.2), CRLF.CRLF at the end."""
    data = body.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def refusal(envelope: Envelope, extensions: dict[str, str], size: int) -> Outcome | None:
    """Why this server cannot take this message as it is (we don't downgrade), or None."""
    limit = size_limit(extensions)
    if limit and size > limit:
        return local("bounced", "5.3.4", f"message size {size} exceeds the server's limit of {limit} bytes",
                     scope="message", phase="mail", reason="mesgtoobig")
    if envelope.smtputf8 and "SMTPUTF8" not in extensions:
        return local("bounced", "5.6.7", "the message needs SMTPUTF8, which the server does not offer",
                     scope="message", phase="mail")
    if envelope.body_type.upper() == "8BITMIME" and "8BITMIME" not in extensions:
        return local("bounced", "5.6.3", "the message is 8-bit and the server does not offer 8BITMIME",
                     scope="message", phase="mail")
    if unsafe(envelope.sender):
        return local("bounced", "5.1.7", "sender address has control characters", scope="message", phase="mail")
    return None


def mail_command(envelope: Envelope, extensions: dict[str, str], size: int) -> bytes:
    """MAIL FROM with the parameters the server understands (SIZE, BODY, SMTPUTF8, RET, ENVID)."""
    words = [f"MAIL FROM:<{envelope.sender}>"]
    if "SIZE" in extensions:
        words.append(f"SIZE={size}")
    body_type = envelope.body_type.upper()
    if body_type in ("7BIT", "8BITMIME") and "8BITMIME" in extensions:
        words.append(f"BODY={body_type}")
    if envelope.smtputf8:
        words.append("SMTPUTF8")
    if "DSN" in extensions:
        if envelope.ret.upper() in ("FULL", "HDRS"):
            words.append(f"RET={envelope.ret.upper()}")
        if envelope.envid and _param_safe(envelope.envid):
            words.append(f"ENVID={envelope.envid}")
    return (" ".join(words) + "\r\n").encode("utf-8")


def rcpt_command(recipient: Recipient, extensions: dict[str, str]) -> bytes:
    """RCPT TO with NOTIFY and ORCPT relayed when the server offers DSN (RFC 3461 4.1)."""
    words = [f"RCPT TO:<{recipient.address}>"]
    if "DSN" in extensions:
        if recipient.notify and _param_safe(recipient.notify):
            words.append(f"NOTIFY={recipient.notify}")
        if recipient.orcpt and _param_safe(recipient.orcpt):
            words.append(f"ORCPT={recipient.orcpt}")
    return (" ".join(words) + "\r\n").encode("utf-8")


def _param_safe(value: str) -> bool:
    """An xtext/keyword value fit to put on a command line (RFC 3461 4: printable ASCII, no "=")."""
    return bool(value) and all(33 <= ord(c) <= 126 and c != "=" for c in value)


def unsafe(address: str) -> bool:
    """An address that could break out of a command line (CR, LF, NUL, angle brackets)."""
    return any(c in address for c in "\r\n\0<>")
