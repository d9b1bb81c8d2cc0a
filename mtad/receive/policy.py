"""SMTP command decisions: parse MAIL and RCPT arguments, their ESMTP parameters, and relay policy.

Pure: every function takes the command text and session facts and returns a value or a typed
Reply; nothing here writes to a socket. The session (session.py) does the writing.

Trust: command arguments come from the peer and are hostile; parameter values are kept only
after validation, and kept as given (xtext is not decoded) so DSNs can echo them.
Sender rights on submission: an authenticated tenant may use as envelope sender and in From
only addresses at domains it owns (`Tenant.owns`: its domains and their subdomains).

RFCs: 5321 4.1.1.2-3 (MAIL, RCPT), 4.5.1 (Postmaster), 1870 (SIZE), 6152 (8BITMIME BODY=),
6531 3.4 (SMTPUTF8), 3461 4.1-4.4 (RET, ENVID, NOTIFY, ORCPT), 3463 (status codes), 6409 4.3
and 8 (submission: authenticated senders, the MSA may refuse what the account does not own),
5322 3.6.2 (From).
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass
from typing import Protocol

from mtad import reply
from mtad.address import (
    AddressError,
    Mailbox,
    Verdict,
    classify_recipient,
    parse_path,
    split_path,
)
from mtad.reply import Reply

# RFC 5321 4.1.2 esmtp-keyword; RFC 3461 4 xtext is printable ASCII without "+" and "=",
# except "+" followed by two upper-case hex digits.
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# MAIL parameters whose grammar requires "=value" (RFC 1870 3, RFC 6152 2, RFC 3461 4.3-4.4).
_MAIL_VALUED = ("SIZE", "BODY", "RET", "ENVID")
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2: an ORCPT parameter's value is at most 500 characters

SUBMISSION_ROLES = frozenset({"submission", "submissions"})
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by this account")
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Null sender not allowed on submission")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From header address not owned by this account")
_HEADER_PARSER = email.parser.HeaderParser(policy=email.policy.default)
# A From field with its folded continuation lines (RFC 5322 2.2.3), at the start of a line.
_FROM_FIELD = re.compile(rb"(?:^|(?<=\n))[Ff][Rr][Oo][Mm][ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")


class Owner(Protocol):
    """What sender rights need of a tenant (mtad.platform.model.Tenant is one)."""

    def owns(self, domain: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class MailRequest:
    """A parsed MAIL FROM: the sender (None for <>) and the parameters we keep."""

    sender: Mailbox | None
    size: int = 0
    body_type: str = ""
    smtputf8: bool = False
    ret: str = ""
    envid: str = ""


@dataclass(frozen=True, slots=True)
class RcptRequest:
    """A parsed RCPT TO: the recipient and its RFC 3461 parameters, as given."""

    mailbox: Mailbox
    notify: str = ""
    orcpt: str = ""


def strip_keyword(arg: str | None, keyword: str) -> str | None:
    """`FROM:<a@b>` -> `<a@b>`; None when the keyword is missing (RFC 5321 4.1.1.2)."""
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    # Not in the grammar, but widely sent: a space between "FROM:" and the path.
    return arg[len(keyword):].lstrip(" ")


def parse_params(text: str, *, esmtp: bool, smtputf8: bool = False) -> dict[str, str] | Reply:
    """`SIZE=10 BODY=8BITMIME` -> {"SIZE": "10", "BODY": "8BITMIME"}; keywords upper-cased,
    values kept as given. A keyword without a value maps to ""."""
    if not text:
        return {}
    if not esmtp:
        # Parameters exist only in a session that said EHLO (RFC 5321 4.1.1.2).
        return reply.BAD_SYNTAX
    params: dict[str, str] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not value):
            return reply.BAD_SYNTAX
        if not value.isascii() and not smtputf8:
            return reply.BAD_SYNTAX
        keyword = keyword.upper()
        if keyword in params:
            return reply.BAD_SYNTAX
        params[keyword] = value
    return params


def _path_and_params(arg: str | None, keyword: str, *, esmtp: bool,
                     smtputf8: bool) -> tuple[str, str, dict[str, str]] | Reply:
    """`FROM:<path> PARAMS` / `TO:<path> PARAMS` cut into the path, the parameter text and
    the parameters parsed from it."""
    text = strip_keyword(arg, keyword)
    if text is None:
        return reply.BAD_SYNTAX
    try:
        path, param_text = split_path(text)
    except AddressError:
        return reply.BAD_ADDRESS
    params = parse_params(param_text, esmtp=esmtp, smtputf8=smtputf8)
    if isinstance(params, Reply):
        return params
    return path, param_text, params


def parse_mail(arg: str | None, *, esmtp: bool, max_size: int) -> MailRequest | Reply:
    """Decide a MAIL command's argument: a MailRequest, or the Reply refusing it."""
    split = _path_and_params(arg, "FROM:", esmtp=esmtp, smtputf8=True)
    if isinstance(split, Reply):
        return split
    path, param_text, params = split
    if any(params.get(keyword) == "" for keyword in _MAIL_VALUED):
        return reply.BAD_SYNTAX  # `BODY` or `RET` alone is not "BODY=7BIT"
    smtputf8 = False
    if "SMTPUTF8" in params:
        if params.pop("SMTPUTF8"):
            return reply.BAD_SYNTAX
        smtputf8 = True
    elif not param_text.isascii():
        return reply.BAD_SYNTAX
    try:
        sender = parse_path(path, smtputf8=smtputf8, null_ok=True)
    except AddressError as exc:
        return reply.NON_ASCII_ADDRESS if exc.non_ascii else reply.BAD_ADDRESS
    size = 0
    if "SIZE" in params:
        value = params.pop("SIZE")
        if not value.isdigit() or len(value) > 20:
            return reply.BAD_SYNTAX
        size = int(value)
        if size > max_size:
            return reply.MESSAGE_TOO_BIG  # RFC 1870 6.1
    body_type = params.pop("BODY", "").upper()
    if body_type not in ("", "7BIT", "8BITMIME"):
        return reply.BAD_SYNTAX  # BINARYMIME needs CHUNKING, which we do not offer
    ret = params.pop("RET", "").upper()
    if ret not in ("", "FULL", "HDRS"):
        return reply.BAD_SYNTAX
    envid = params.pop("ENVID", None)
    if envid is not None and not _valid_xtext(envid, MAX_ENVID):
        return reply.BAD_SYNTAX
    if params:
        return reply.PARAM_NOT_RECOGNIZED
    return MailRequest(sender, size, body_type, smtputf8, ret, envid or "")


def parse_rcpt(arg: str | None, *, esmtp: bool, smtputf8: bool, hostname: str) -> RcptRequest | Reply:
    """Decide a RCPT command's argument (syntax only; relay policy is `recipient_reply`)."""
    split = _path_and_params(arg, "TO:", esmtp=esmtp, smtputf8=smtputf8)
    if isinstance(split, Reply):
        return split
    path, _, params = split
    try:
        if path.lower() == "<postmaster>":
            # RFC 5321 4.5.1: <Postmaster> without a domain names this host's postmaster.
            mailbox = Mailbox("postmaster", hostname.lower().rstrip("."))
        else:
            parsed = parse_path(path, smtputf8=smtputf8, null_ok=False)
            assert parsed is not None
            mailbox = parsed
    except AddressError as exc:
        return reply.NON_ASCII_ADDRESS if exc.non_ascii else reply.BAD_ADDRESS
    notify = ""
    if "NOTIFY" in params:
        notify = params.pop("NOTIFY").upper()
        words = notify.split(",")
        if not (notify == "NEVER" or (set(words) <= _NOTIFY and len(set(words)) == len(words))):
            return reply.BAD_SYNTAX
    orcpt = ""
    if "ORCPT" in params:
        orcpt = params.pop("ORCPT")
        addr_type, semi, value = orcpt.partition(";")
        if not semi or not _ADDR_TYPE.fullmatch(addr_type) or not value or len(orcpt) > MAX_ORCPT:
            return reply.BAD_SYNTAX
        if addr_type.lower() != "utf-8" and not _XTEXT.fullmatch(value):
            return reply.BAD_SYNTAX
    if params:
        return reply.PARAM_NOT_RECOGNIZED
    return RcptRequest(mailbox, notify, orcpt)


def _valid_xtext(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and _XTEXT.fullmatch(value) is not None


def recipient_reply(mailbox: Mailbox, *, role: str, local_domains: frozenset[str], hostname: str = "",
                    authenticated: bool = False) -> Reply:
    """Relay policy: which recipients a listener takes.

    An authenticated submission session relays to any domain (RFC 6409 4.3). Otherwise every
    role accepts only plain local parts at our own domains (submission does not get that far
    without AUTH: MAIL already answered 530). Refusals are `550 5.7.1` whatever the trick, so
    a prober learns nothing about which one we saw through.
    """
    if authenticated and role in SUBMISSION_ROLES and not mailbox.literal:
        return reply.RECIPIENT_OK
    if hostname and mailbox.domain == hostname.lower().rstrip(".") and mailbox.local.lower() == "postmaster":
        return reply.RECIPIENT_OK  # RFC 5321 4.5.1: this host's postmaster is always accepted
    if classify_recipient(mailbox, local_domains) is Verdict.LOCAL:
        return reply.RECIPIENT_OK
    return reply.RELAY_DENIED


def ehlo_lines(hostname: str, *, max_size: int, tls_offered: bool, auth: tuple[str, ...] = ()) -> bytes:
    """The EHLO response, as bytes ready to write; `auth` the SASL mechanisms to offer (RFC
    4954 4: only inside TLS, which the caller decides)."""
    keywords = [hostname, "PIPELINING", f"SIZE {max_size}", "8BITMIME", "SMTPUTF8",
                "ENHANCEDSTATUSCODES", "DSN"]
    if tls_offered:
        keywords.append("STARTTLS")
    if auth:
        keywords.append("AUTH " + " ".join(auth))
    lines = [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def clean_helo(arg: str) -> str:
    """The HELO/EHLO argument as we record it: printable ASCII, one word, at most 255 chars.

    It ends up in a Received header and the mail log, so anything else becomes `?`.
    """
    word = arg.strip(" ").split(" ", 1)[0][:255]
    if word.isascii() and word.isprintable():
        return word
    return "".join(ch if " " < ch <= "~" else "?" for ch in word)


def sender_reply(sender: Mailbox | None, owner: Owner) -> Reply | None:
    """MAIL FROM on submission: None when the authenticated tenant may use this sender."""
    if sender is None:
        return NULL_SENDER_REFUSED  # bounces are ours to send, not a submitting client's
    if sender.literal or not owner.owns(sender.domain):
        return SENDER_NOT_OWNED
    return None


def from_domains(section: bytes | bytearray) -> list[str] | None:
    """The domains of every address in every From field of a header section; None when there
    is no From, or one that yields no address (empty, a group, unparseable).

    Only the header section is parsed (the email package's header parser, modern policy).
    """
    # Only the From fields go to the parser (~140 us a message, most of it the address parser).
    found = b"".join(_FROM_FIELD.findall(section))
    fields = _HEADER_PARSER.parsestr(found.decode("utf-8", "surrogateescape")).get_all("From") if found else None
    if not fields:
        return None
    domains = []
    for field in fields:
        addresses = getattr(field, "addresses", ())
        if not addresses:
            return None
        for address in addresses:
            if not address.domain or not address.username:
                return None
            domains.append(str(address.domain))
    return domains


def from_reply(section: bytes | bytearray, owner: Owner) -> Reply | None:
    """The end of DATA on submission: None when every From address is at a domain the
    tenant owns; FROM_NOT_OWNED otherwise, and when From is missing or yields no address."""
    domains = from_domains(section)
    if not domains or not all(owner.owns(domain) for domain in domains):
        return FROM_NOT_OWNED
    return None
