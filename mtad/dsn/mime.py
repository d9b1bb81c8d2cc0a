"""Take any message apart into what a bounce reader needs: headers, report blocks, texts, original.

Pure. Line endings are normalised (CRLF, CR and LF alike) and the input is capped before
`mtad.dsn.entity` (our own MIME reader, tolerant of the broken MIME real MTAs send)
builds the tree. Nothing here decides whether the message is a bounce.
Trust: the whole input is hostile; sizes are capped and every decoder errs with "replace".
RFCs: 2045-2047 (MIME, encoded words), 3462/6522 (multipart/report), 3464 (delivery-status
as a text block list), 5965 (message/feedback-report), 6533 (global delivery status).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header

from mtad.dsn.entity import Entity, read_entity

MAX_INPUT = 1 << 20  # bytes of a message we look at; a bounce worth reading is far smaller
MAX_TEXT = 64 * 1024  # characters of any one text part we keep
MAX_PARTS = 64

_DS_TYPES = ("message/delivery-status", "message/global-delivery-status", "text/delivery-status")
_FEEDBACK_TYPES = ("message/feedback-report",)
_ORIGINAL_TYPES = ("message/rfc822", "message/global", "message/partial")
_HEADER_TYPES = ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers")

# A line that introduces the returned original inside a plain-text bounce (Exim, qmail,
# Sendmail, Courier, Exchange, Domino and many appliances word it differently).
_ORIGINAL_MARK = re.compile(
    r"^[ \t]*(?:[-=_*]{2,}|>{3})?[ \t]*(?:"
    r"this is a copy of|below this line is a copy|(?:the )?original message(?! (?:was|is|has))|"
    r"original mail|unsent message|returned message|message (?:header|text)s? follows?|"
    r"(?:the )?headers? of (?:the|your) (?:original )?message|original header|"
    r"content-type: message/rfc822|forwarded message|message follows|"
    r"your message (?:reads|was)|message as received|start of returned message"
    r")[^\n]{0,100}$",
    re.IGNORECASE | re.MULTILINE,
)
_HEADER_LINE = re.compile(r"^(?:Received|Return-Path|Message-I[dD]|From|Date|Subject|To|MIME-Version|X-[\w-]{1,40}):[ \t]")
_TAG = re.compile(r"<[^<>]{0,2000}>")
_BREAK_TAG = re.compile(r"<(?:br|/p|/div|/tr|/li|/h\d|p|div|tr|li|table|/table)\b[^<>]{0,2000}>", re.IGNORECASE)
_SCRIPT = re.compile(r"<(script|style)\b[^<>]{0,500}>.{0,20000}?</\1\s*>", re.IGNORECASE | re.DOTALL)


@dataclass
class Parts:
    """The pieces of one message, decoded to str."""

    message: Entity
    ds_text: list[str] = field(default_factory=list)
    """Each delivery-status part as text (blocks separated by blank lines)."""
    feedback: list[list[tuple[str, str]]] = field(default_factory=list)
    """Fields of each message/feedback-report part, in order (repeated fields kept)."""
    texts: list[str] = field(default_factory=list)
    """The human-readable parts, with any inline copy of the original cut off."""
    original: Entity | None = None
    """Headers (and maybe body) of the returned original message."""
    original_text: str = ""
    """An inline copy of the original found in a text part (unparsed)."""

    def header(self, name: str) -> str:
        return header_text(self.message, name)


def normalise(data: bytes) -> bytes:
    """Cap the size, make every line end in LF, drop an mbox "From " separator."""
    data = data[:MAX_INPUT]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        data = data[nl + 1 :] if nl >= 0 else b""
    return data.lstrip(b"\n")


def header_text(msg: Entity, name: str) -> str:
    """A header decoded (RFC 2047) to one line; "" when absent or undecodable."""
    raw = msg.get(name)
    if raw is None:
        return ""
    value = str(raw)
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except (ValueError, LookupError, UnicodeError, TypeError):
            pass
    return " ".join(value.split())


def split_parts(data: bytes) -> Parts:
    data = trim_originals(normalise(data))
    msg = read_entity(data.decode("latin-1"))
    if not msg.is_multipart():
        repaired = _undeclared_multipart(data)
        if repaired is not None:
            msg = read_entity(repaired.decode("latin-1"))
    parts = Parts(message=msg)
    _walk(msg, parts, 0, [0])
    return parts


_RFC822_PART = re.compile(
    rb"^content-type:[ \t]*(?:message/(?:rfc822|global)|text/rfc822-headers)(?![\w-])", re.IGNORECASE | re.MULTILINE
)
_BOUNDARY_PARAM = re.compile(rb"boundary=(?:\"([^\"\n]{1,200})\"|([^\s;\"]{1,200}))", re.IGNORECASE)


def trim_originals(data: bytes) -> bytes:
    """Drop the body of a returned original (message/rfc822 part): only its headers
    (Message-ID, To) matter, and parsing its MIME tree is most of the work otherwise.

    The cut runs from the blank line after the embedded headers to the next boundary
    line of an enclosing multipart declared before the part; nothing is cut when that
    boundary cannot be found.
    """
    found = _RFC822_PART.search(data)
    if not found:
        return data
    outer = [m.group(1) or m.group(2) for m in _BOUNDARY_PARAM.finditer(data, 0, found.start())]
    if not outer:
        return data
    part_head_end = data.find(b"\n\n", found.end())
    if part_head_end < 0:
        return data
    inner_head_end = data.find(b"\n\n", part_head_end + 2)
    if inner_head_end < 0:
        return data
    start = inner_head_end + 1
    if any(data.find(b"\n--" + b, part_head_end, start) >= 0 for b in outer):
        return data  # the part ended before its headers did
    ends = [data.find(b"\n--" + b, start) for b in outer]
    ends = [e for e in ends if e >= 0]
    if not ends:
        return data
    return data[:start] + data[min(ends) :]


_BOUNDARY_LINE = re.compile(rb"^--([^\s\"]{4,200})[ \t]*$", re.MULTILINE)


def _undeclared_multipart(data: bytes) -> bytes | None:
    """Some MTAs send a MIME body without the multipart Content-Type header (or with a
    wrong one); when the body plainly has boundary lines and part headers, declare it."""
    head, sep, body = data.partition(b"\n\n")
    if not sep or b"Content-Type:" not in body[:200000] and b"content-type:" not in body[:200000]:
        return None
    found = _BOUNDARY_LINE.search(body[:4000])
    if not found or _ORIGINAL_MARK.search(body[: found.start()].decode("latin-1")):
        return None
    boundary = found.group(1)
    if body.count(b"\n--" + boundary) + body.startswith(b"--" + boundary) < 2:
        return None
    lines = [ln for ln in head.split(b"\n")]
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith((b"content-type:", b"content-transfer-encoding:"))
        if not skipping:
            kept.append(line)
    kept.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
    return b"\n".join(kept) + b"\n\n" + body


def _walk(part: Entity, out: Parts, depth: int, count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_PARTS or depth > 8:
        return
    ctype = part.get_content_type()
    if ctype in _DS_TYPES:
        out.ds_text.append(_decoded(part))
    elif ctype in _FEEDBACK_TYPES:
        out.feedback.append(_fields(_decoded(part)))
    elif ctype in _ORIGINAL_TYPES:
        if out.original is None:
            out.original = part.inner()
    elif ctype in _HEADER_TYPES:
        if out.original is None:
            out.original = read_entity(_decoded(part))
    elif part.parts is not None:
        for sub in part.parts:
            _walk(sub, out, depth + 1, count)
    elif ctype.startswith("message/"):
        # Other embedded messages (an MDN's fields, message/external-body) are read as
        # a message whose own body is the text, as the stdlib parser presents them.
        _walk(part.inner(), out, depth + 1, count)
    elif ctype.startswith(("text/", "multipart/")) or ctype == "application/octet-stream" and depth == 0:
        # A multipart whose boundary never appears is text as far as a reader can tell.
        if depth > 0 and part.get_filename():
            return
        text = _decoded(part)
        if ctype == "text/html":
            text = html_to_text(text)
        body, original = cut_original(text)
        out.texts.append(body)
        if original and not out.original_text:
            out.original_text = original


def _decoded(part: Entity) -> str:
    """A leaf part's body as text: transfer-decoded, charset-decoded, capped."""
    raw = part.body_bytes()
    charset = part.get_content_charset() or "utf-8"
    try:
        text = raw[: MAX_TEXT * 2].decode(charset, "replace")
    except (LookupError, ValueError):
        text = raw[: MAX_TEXT * 2].decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[:MAX_TEXT]


_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9\-]{0,60})[ \t]*:[ \t]*(.*)$")


def _fields(text: str) -> list[tuple[str, str]]:
    """`Name: value` lines with continuations unfolded; names lower-cased."""
    out: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, (value + " " + line.strip()).strip())
            continue
        m = _FIELD.match(line)
        if m:
            out.append((m.group(1).lower(), m.group(2).strip()))
    return out


def field_blocks(text: str) -> list[list[tuple[str, str]]]:
    """A delivery-status body as its blocks (first: per-message; rest: per-recipient)."""
    blocks = []
    for chunk in re.split(r"\n[ \t]*\n", text):
        fields = _fields(chunk)
        if fields:
            blocks.append(fields)
    return blocks


def html_to_text(text: str) -> str:
    text = _SCRIPT.sub(" ", text)
    text = _BREAK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    return html.unescape(text)


def cut_original(text: str) -> tuple[str, str]:
    """Split a plain-text bounce into (notification, inline copy of the original)."""
    mark = _ORIGINAL_MARK.search(text)
    cut = mark.start() if mark else -1
    lines = text.split("\n")
    pos = 0
    run = 0
    run_start = 0
    for line in lines:
        if cut >= 0 and pos >= cut:
            break
        if _HEADER_LINE.match(line):
            if run == 0:
                run_start = pos
            run += 1
            if run >= 3 and run_start > 0:
                cut = run_start
                break
        elif not (line[:1] in (" ", "\t") and run):
            run = 0
        pos += len(line) + 1
    if cut < 0:
        return text, ""
    return text[:cut], text[cut:]
