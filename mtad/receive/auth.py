"""SMTP AUTH on the server side: the AUTH command, SASL PLAIN and LOGIN decoding, the replies.

Pure: the session (session.py) reads and writes the exchange and awaits the tenant directory;
everything here takes the peer's text and returns values or a typed Reply. The decision of
*when* AUTH may run (TLS first, EHLO first, not twice, not inside a transaction) is
`auth_refusal`; the exchange itself is `parse_auth` then `decode_plain` / `decode_login_step`.

The password is held only in the `Credentials` value handed to the directory; it never reaches
a log line, an event or a reply.

Trust: every byte of the exchange is the peer's and hostile: base64 is decoded strictly, the
decoded text must be UTF-8 without NUL or control characters in the username, and lengths are
bounded by the command line limit the session reads with.
RFCs: 4954 4 (AUTH command, 334 continuation, "*" cancel, "=" empty initial response), 4954 6
(status codes 235 2.7.0, 535 5.7.8, 538 5.7.11, 530 5.7.0, 454 4.7.0, 504 5.5.4, 501 5.5.2 /
5.7.0, 503 5.5.1, 500 5.5.6), 4616 2 (PLAIN message: [authzid] NUL authcid NUL passwd), the
LOGIN mechanism as draft-murchison-sasl-login describes it (the "Username:" / "Password:" prompts).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from mtad import reply
from mtad.reply import Reply

Mechanism = Literal["PLAIN", "LOGIN"]
MECHANISMS: tuple[Mechanism, ...] = ("PLAIN", "LOGIN")
"""What EHLO advertises after TLS, in this order."""

MAX_USERNAME = 255
"""Longest username we look up (longer ones fail without a look-up)."""
MAX_PASSWORD = 1024

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
EXCHANGE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
TOO_MANY_FAILURES = Reply(454, "4.7.0", "Too many failed authentications, try later")
TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")

# RFC 4954 4: the server challenge is base64; PLAIN's is empty ("334 " and nothing after it).
PLAIN_CHALLENGE = b"334 \r\n"
LOGIN_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
LOGIN_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"


@dataclass(frozen=True, slots=True)
class AuthStart:
    """A parsed AUTH command: the mechanism and the initial response, if one was sent.

    `initial` is None when the client sent none (a challenge follows), b"" for "=" (an empty
    initial response, RFC 4954 4), else the decoded bytes.
    """

    mechanism: Mechanism
    initial: bytes | None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client claimed: the username and the password. Never logged."""

    username: str
    password: str = ""

    def __repr__(self) -> str:  # a stray debug print or traceback must not show the password
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def auth_refusal(*, role: str, tls: bool, helo: str, esmtp: bool, authenticated: bool,
                 in_transaction: bool) -> Reply | None:
    """Whether AUTH may run now; None to go ahead, else the reply refusing it.

    The mx role has no AUTH at all (502, as for any command it does not implement).
    """
    if role == "mx":
        return reply.NOT_IMPLEMENTED
    if not helo or not esmtp:
        return reply.NEED_HELO  # AUTH is an ESMTP extension: it exists only after EHLO
    if authenticated:
        return ALREADY_AUTHENTICATED  # RFC 4954 4: AUTH once per session
    if in_transaction:
        return reply.TRANSACTION_IN_PROGRESS  # RFC 4954 4: not during a mail transaction
    if not tls:
        return ENCRYPTION_REQUIRED  # RFC 4954 4 and 6: never credentials in the clear
    return None


def parse_auth(arg: str | None) -> AuthStart | Reply:
    """`AUTH PLAIN dGVzdA==` -> AuthStart("PLAIN", b"test"); a Reply for what is refused."""
    if not arg:
        return reply.BAD_SYNTAX
    words = arg.split(" ")
    if len(words) > 2 or not all(words):
        return reply.BAD_SYNTAX
    name = words[0].upper()
    if name not in MECHANISMS:
        return UNKNOWN_MECHANISM
    mechanism: Mechanism = "PLAIN" if name == "PLAIN" else "LOGIN"
    if len(words) == 1:
        return AuthStart(mechanism, None)
    if words[1] == "=":
        return AuthStart(mechanism, b"")
    if words[1] == "*":
        return CANCELLED  # not in the grammar for an initial response, but unambiguous
    decoded = decode_base64(words[1])
    if isinstance(decoded, Reply):
        return decoded
    return AuthStart(mechanism, decoded)


def decode_response(line: bytes) -> bytes | Reply:
    """One client line of the exchange (no line end): the decoded bytes, or CANCELLED /
    BAD_BASE64. An empty line is an empty response."""
    text = line.strip(b" ")
    if text == b"*":
        return CANCELLED
    return decode_base64(text)


def decode_base64(text: str | bytes) -> bytes | Reply:
    """Strict base64 (RFC 4648 alphabet, padding required): anything else is BAD_BASE64."""
    try:
        raw = text.encode("ascii") if isinstance(text, str) else text
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return BAD_BASE64


def decode_plain(message: bytes) -> Credentials | Reply:
    """RFC 4616 2: `[authzid] NUL authcid NUL passwd`, UTF-8.

    We authorise only as ourselves: an authzid must be empty or equal the authcid (acting for
    another account would need a rule that says who may; there is none). A message that does
    not parse is BAD_BASE64's sibling, 501 5.5.2; one that parses but names somebody else, or
    has an empty username or password, is a failed authentication (535 5.7.8).
    """
    parts = message.split(b"\x00")
    if len(parts) != 3:
        return BAD_BASE64
    try:
        authzid, authcid, passwd = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return BAD_BASE64
    if not authcid or not passwd or (authzid and authzid != authcid):
        return AUTH_FAILED
    return _credentials(authcid, passwd)


def decode_login_step(message: bytes) -> str | Reply:
    """One decoded LOGIN response (the username or the password) as text."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_BASE64
    if "\x00" in text:
        return BAD_BASE64
    return text


def login_credentials(username: str, password: str) -> Credentials | Reply:
    """LOGIN's two answers as Credentials, or AUTH_FAILED when either is unusable."""
    if not username or not password:
        return AUTH_FAILED
    return _credentials(username, password)


def _credentials(username: str, password: str) -> Credentials | Reply:
    if len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD or not username.isprintable():
        return AUTH_FAILED
    return Credentials(username, password)


def loggable_username(username: str) -> str:
    """The username as the mail log records it: printable, at most MAX_USERNAME characters."""
    text = username[:MAX_USERNAME]
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text)
