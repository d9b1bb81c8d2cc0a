"""A small MIME reader for bounces: header blocks, multipart splitting, transfer decoding.

Pure. `read_entity(text)` turns one message into a tree of `Entity` objects: headers
(name, raw value with folding kept), the body as an undecoded slice, children for a
multipart whose boundary occurs, and, on demand, the message inside a message/* part.
It replaces the stdlib `email` parser on the bounce path (that parser builds far more
than a bounce reader looks at and was a third of the parse time) and follows its
compat32 behaviour where real bounces depend on it: a header block ends at the first
line that is not a header; a multipart whose opening boundary never occurs is one text;
a missing closing boundary lets the last part run to the end; an inner part also ends
at a boundary line of any enclosing multipart (the outer split happens first).
The stdlib still does the hard parts: binascii for base64 and quoted-printable.
Input is text decoded as latin-1 (one character per byte, lossless) with LF line
endings; `body_bytes()` gives the original bytes back for charset decoding.
Trust: the input is hostile; parts, depth and header counts are capped, every search is
a linear scan, and decoders never raise.
RFCs: 2045 (headers, Content-Transfer-Encoding), 2046 section 5.1 (multipart, boundary
lines), 2231 (parameter continuations and charsets), 5322 section 2.2 (header folding).
"""

from __future__ import annotations

import binascii
import re
from itertools import pairwise
from urllib.parse import unquote

MAX_HEADERS = 500  # header fields kept per entity
MAX_CHILDREN = 64  # parts kept per multipart
MAX_DEPTH = 10  # nesting of multiparts and message/* parts

_DIGEST = "multipart/digest"


class Entity:
    """One MIME entity: its header fields and body (a message, a part, or an embedded message)."""

    __slots__ = ("_ctype", "_fields", "_inner", "body", "default_type", "depth", "parts")

    def __init__(self, fields: list[tuple[str, str, str]], body: str, default_type: str, depth: int) -> None:
        self._fields = fields
        self.body = body
        """The body as latin-1 text, transfer encoding not undone."""
        self.parts: list[Entity] | None = None
        """Children of a multipart whose boundary occurs; None otherwise."""
        self.default_type = default_type
        self.depth = depth
        self._ctype: str | None = None
        self._inner: Entity | None = None

    # Header access, shaped like email.message.Message so callers read the same.
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field called `name` (any case), folding kept; `default` if absent."""
        key = name.lower()
        for lower, _, value in self._fields:
            if lower == key:
                return value
        return default

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for _, name, value in self._fields]

    def is_multipart(self) -> bool:
        return self.parts is not None

    def get_content_type(self) -> str:
        if self._ctype is None:
            raw = self.get("content-type")
            ctype = self.default_type
            if raw is not None:
                value = raw.split(";", 1)[0].strip().lower()
                if value.count("/") == 1:
                    ctype = value
                else:
                    ctype = "text/plain"  # RFC 2045 section 5.2: unreadable means text/plain
            self._ctype = ctype
        return self._ctype

    def get_param(self, name: str, header: str = "content-type") -> str | None:
        raw = self.get(header)
        return None if raw is None else param(raw, name)

    def get_filename(self) -> str | None:
        return self.get_param("filename", "content-disposition") or self.get_param("name")

    def get_content_charset(self) -> str | None:
        charset = self.get_param("charset")
        if not charset or not charset.isascii():
            return None
        return charset.strip().lower()

    def body_bytes(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone (base64, quoted-printable)."""
        raw = self.body.encode("latin-1", "replace")
        cte = (self.get("content-transfer-encoding") or "").strip().lower()
        if cte == "base64":
            return decode_base64(raw)
        if cte == "quoted-printable":
            try:
                return binascii.a2b_qp(raw)
            except (binascii.Error, ValueError):
                return raw
        return raw

    def inner(self) -> Entity:
        """The message inside a message/* part (parsed on first use)."""
        if self._inner is None:
            body = self.body
            if (self.get("content-transfer-encoding") or "").strip().lower() in ("base64", "quoted-printable"):
                body = self.body_bytes().decode("latin-1")
            self._inner = read_entity(body, depth=self.depth + 1)
        return self._inner


def read_entity(text: str, default_type: str = "text/plain", depth: int = 0) -> Entity:
    """Parse one entity (headers, blank line, body) from LF-terminated latin-1 text."""
    fields, body = _read_header_block(text)
    entity = Entity(fields, body, default_type, depth)
    ctype = entity.get_content_type()
    if ctype.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = entity.get_param("boundary")
        if boundary:
            pieces = split_multipart(body, boundary.rstrip())
            if pieces is not None:
                child_type = "message/rfc822" if ctype == _DIGEST else "text/plain"
                entity.parts = [read_entity(p, child_type, depth + 1) for p in pieces]
    return entity


def _read_header_block(text: str) -> tuple[list[tuple[str, str, str]], str]:
    """(fields, body): fields end at a blank line or at the first line that is not a field."""
    fields: list[tuple[str, str, str]] = []
    pos = 0
    end = len(text)
    while pos < end:
        found = _FIELD.match(text, pos)
        if found is not None:
            name = found.group(1)
            if name and len(fields) < MAX_HEADERS:
                value = found.group(2)
                if not value.isascii():
                    value = _utf8(value)
                fields.append((name.lower(), name, value))
            pos = found.end()
            continue
        nl = text.find("\n", pos)
        nl = end if nl < 0 else nl
        if nl == pos:
            pos += 1  # the blank line belongs to neither side
            break
        if text.startswith(("From ", ">From ", " ", "\t"), pos):
            # An mbox separator, or a continuation with no field before it: not a field.
            pos = nl + 1
            continue
        break  # compat32: the first non-field line starts the body
    return fields, text[pos:] if pos < end else ""


# A field: name (printable, no colon, maybe empty as compat32 allows), colon, value with
# its continuation lines. Each line is bounded by the input; no nested quantifiers.
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]*):[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)\n?")


def _utf8(value: str) -> str:
    # Raw 8-bit header text is UTF-8 far more often than anything else (RFC 6532).
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return value  # already real text (a part decoded with its charset)


def split_multipart(body: str, boundary: str) -> list[str] | None:
    """The parts between boundary lines; None when the opening boundary never occurs."""
    delim = "--" + boundary
    starts: list[int] = []  # index of each boundary line
    closes = False
    pos = 0 if body.startswith(delim) else _next_line_with(body, "\n" + delim, 0)
    while pos >= 0 and len(starts) <= MAX_CHILDREN:
        eol = body.find("\n", pos)
        line_end = len(body) if eol < 0 else eol
        rest = body[pos + len(delim) : line_end]
        is_close = rest.startswith("--")
        if not (rest[2:] if is_close else rest).strip(" \t"):
            starts.append(pos)
            if is_close:
                closes = True
                break
        pos = _next_line_with(body, "\n" + delim, line_end)
    if not starts:
        return None
    if not closes:
        starts.append(len(body) + 1)  # compat32: the last part runs to the end
    pieces = []
    for here, there in pairwise(starts):
        eol = body.find("\n", here)
        if eol < 0 or eol + 1 > there - 1:
            pieces.append("")
        else:
            pieces.append(body[eol + 1 : there - 1])  # the LF before a boundary belongs to it
    return pieces[:MAX_CHILDREN]


def _next_line_with(body: str, needle: str, start: int) -> int:
    found = body.find(needle, start)
    return found + 1 if found >= 0 else -1


_PARAM = re.compile(r"""\s*([^\s=;"]{1,100})\s*=\s*(?:"((?:[^"\\]|\\.){0,2000})"|([^;]{0,2000}))""", re.DOTALL)


def param(header_value: str, name: str) -> str | None:
    """A Content-Type/Content-Disposition parameter, RFC 2231 continuations joined."""
    key = name.lower()
    _, _, rest = header_value.partition(";")
    plain: str | None = None
    pieces: dict[int, str] = {}
    extended = False
    pos = 0
    while pos < len(rest):
        found = _PARAM.match(rest, pos)
        semi = rest.find(";", found.end() if found else pos)
        pos = len(rest) if semi < 0 else semi + 1
        if not found:
            continue
        pname = found.group(1).lower()
        quoted = found.group(2)
        value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else (found.group(3) or "").strip()
        if pname == key:
            plain = value if plain is None else plain
        elif pname.startswith(key + "*"):
            # RFC 2231 section 3/4: name*=charset'lang'value, name*0=..., name*1*=...
            tail = pname[len(key) + 1 :]
            if tail.endswith("*") or not tail:
                extended = True
                tail = tail.rstrip("*")
            if tail and not tail.isdigit() or len(tail) > 2:
                continue
            pieces.setdefault(int(tail or 0), value)
    if not pieces:
        return plain
    joined = "".join(pieces[i] for i in sorted(pieces))
    if not extended:
        return joined
    charset = "utf-8"
    if joined.count("'") >= 2:
        charset, _, joined = joined.split("'", 2)
    try:
        return unquote(joined, encoding=charset or "utf-8", errors="replace")
    except LookupError:
        return unquote(joined, errors="replace")


_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def decode_base64(raw: bytes) -> bytes:
    """Lenient base64: whitespace and stray characters skipped, missing padding added."""
    data = b"".join(raw.split())
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        pass
    # A stray character or an early '=' (concatenated encodings): decode 4-byte groups.
    out = bytearray()
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    clean = clean[: len(clean) - len(clean) % 4]
    try:
        out += binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return raw
    return bytes(out)
