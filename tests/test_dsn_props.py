"""Property tests: random and mutated messages never make the DSN parser raise or stall; the
MIME reader on broken structure; the phrase pre-filter never hides a match."""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtad.dsn import DsnRecord, classify_reply, parse
from mtad.dsn.entity import MAX_CHILDREN, MAX_HEADERS, decode_base64, param, read_entity
from mtad.dsn.needles import needles
from mtad.dsn.phrases import TABLE, _fast
from mtad.dsn.record import CLASSES

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "bounces" / "mail"
_SEEDS = sorted(CORPUS.rglob("*.eml"))[::7] if CORPUS.exists() else []
_FALLBACK = (
    b"From: MAILER-DAEMON@x.example\nSubject: Undelivered Mail\nContent-Type: multipart/report; "
    b'report-type=delivery-status; boundary="b"\n\n--b\nContent-Type: text/plain\n\n<a@b.example>: 550 5.1.1 '
    b"user unknown\n--b\nContent-Type: message/delivery-status\n\nFinal-Recipient: rfc822; a@b.example\n"
    b"Action: failed\nStatus: 5.1.1\n--b--\n"
)
SEEDS = [p.read_bytes() for p in _SEEDS] or [_FALLBACK]
LIMIT_SECONDS = 1.0

# Fragments that exercise the parser's branches when spliced into messages.
FRAGMENTS = [
    b"\nContent-Type: multipart/report; boundary=\"z\"\n", b"\n--z\n", b"\n--z--\n",
    b"\nContent-Type: message/delivery-status\n\n", b"\nFinal-Recipient: rfc822; ", b"\nAction: failed\n",
    b"\nStatus: 5.", b"\nDiagnostic-Code: smtp; 550 ", b"Content-Transfer-Encoding: base64\n",
    b"\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\n", b"<", b">", b"@", b"=?utf-8?b?",
    b"\n\n", b"\r", b"\x00", b"\xff\xfe", b" " * 200, b"a" * 5000, b"@" * 300, b"-" * 500, b"<<<" * 50,
    b"\nX-Failed-Recipients: ", b"\nAuto-Submitted: auto-replied\n", b"Subject: Out of Office\n",
]


def _check(data: bytes) -> None:
    start = time.perf_counter()
    got = parse(data)
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_SECONDS, elapsed
    assert isinstance(got, list)
    for rec in got:
        assert isinstance(rec, DsnRecord)
        assert "@" in rec.recipient
        assert rec.class_ in CLASSES
        assert rec.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.sampled_from(FRAGMENTS), st.integers(0, 64), st.booleans()),
        max_size=8,
    ),
)
def test_mutated_corpus_messages(seed: bytes, edits: list[tuple[float, bytes, int, bool]]) -> None:
    data = bytearray(seed)
    for where, fragment, cut, insert in edits:
        pos = int(where * len(data))
        if insert:
            data[pos:pos] = fragment
        else:
            del data[pos : pos + cut]
    _check(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=3000))
def test_text_messages(text: str) -> None:
    _check(("From: MAILER-DAEMON@x.example\nSubject: failure notice\n\n" + text).encode("utf-8", "surrogatepass"))


def test_pathological_sizes_stay_bounded() -> None:
    long_line = b"From: MAILER-DAEMON@x.example\nSubject: Undeliverable\n\n" + b"a" * 2_000_000
    _check(long_line)
    many_addrs = b"From: MAILER-DAEMON@x.example\nSubject: Undeliverable\n\n" + b"<u@x.example>: 550 x\n" * 50_000
    _check(many_addrs)
    deep = b'Content-Type: multipart/mixed; boundary="a"\n\n' + b'--a\nContent-Type: multipart/mixed; boundary="a"\n\n' * 2000
    _check(deep)


@settings(max_examples=200, deadline=None)
@given(st.integers(-1000, 1000), st.text(max_size=20), st.text(max_size=2000))
def test_classify_reply_is_total(code: int, status: str, text: str) -> None:
    reason, klass = classify_reply(code, status, text)
    assert reason and klass in CLASSES


# The MIME reader (mtad.dsn.entity): broken structure real and hostile senders produce.

def _multipart(body: str, boundary: str = "b1") -> str:
    return f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n{body}'


def test_splitter_reads_parts_and_ignores_preamble_and_epilogue() -> None:
    top = read_entity(_multipart("preamble\n--b1\n\none\n--b1\nContent-Type: text/html\n\n<p>two</p>\n--b1--\nepilogue\n"))
    assert top.parts is not None
    assert [p.body for p in top.parts] == ["one", "<p>two</p>"]
    assert [p.get_content_type() for p in top.parts] == ["text/plain", "text/html"]


def test_splitter_missing_closing_boundary_runs_to_the_end() -> None:
    top = read_entity(_multipart("--b1\n\none\n--b1\n\ntwo\nstill two\n"))
    assert top.parts is not None and [p.body for p in top.parts] == ["one", "two\nstill two\n"]


def test_splitter_boundary_never_found_is_one_text() -> None:
    top = read_entity(_multipart("just text\n--b2\nmore\n"))
    assert top.parts is None and top.get_content_type() == "multipart/mixed"
    assert read_entity('Content-Type: multipart/mixed\n\n--x\n\nbody\n').parts is None  # no boundary param


def test_splitter_boundary_text_inside_a_line_is_not_a_boundary() -> None:
    top = read_entity(_multipart("--b1\n\nsee --b1 here\n--b1x\n --b1\n--b1 \t\n\ntwo\n--b1--  \n"))
    assert top.parts is not None
    assert [p.body for p in top.parts] == ["see --b1 here\n--b1x\n --b1", "two"]


def test_splitter_duplicated_and_nested_boundaries() -> None:
    # The outer split comes first: an inner multipart reusing the outer boundary gets no
    # parts of its own, and the first closing line ends the outer one.
    dup = read_entity(_multipart(
        "--b1\nContent-Type: multipart/alternative; boundary=b1\n\n--b1\n\ninner\n--b1--\n--b1\n\nlost\n"
    ))
    assert dup.parts is not None and [p.body for p in dup.parts] == ["", "inner"]
    assert dup.parts[0].get_content_type() == "multipart/alternative" and dup.parts[0].parts is None
    # An inner part ends at the next outer boundary line even without its own closing line.
    nested = read_entity(_multipart(
        "--b1\nContent-Type: multipart/alternative; boundary=in\n\n--in\n\nx\n--b1\n\nafter\n--b1--\n"
    ))
    assert nested.parts is not None and nested.parts[-1].body == "after"
    inner = nested.parts[0]
    assert inner.parts is not None and [p.body for p in inner.parts] == ["x"]


def test_splitter_caps_parts_headers_and_depth() -> None:
    many = read_entity(_multipart("--b1\n\nx\n" * 10_000))
    assert many.parts is not None and len(many.parts) == MAX_CHILDREN
    huge = read_entity("".join(f"X-H{i}: {'v' * 50}\n" for i in range(50_000)) + "\nbody")
    assert huge.get("x-h0") == "v" * 50 and huge.body == "body"
    assert len(huge.items()) == MAX_HEADERS
    deep = 'Content-Type: message/rfc822\n\n' * 200 + "Subject: bottom\n\nx"
    part = read_entity(deep)
    for _ in range(200):
        if part.get_content_type() != "message/rfc822":
            break
        part = part.inner()
    assert part.get("subject") == "bottom"


def test_header_block_ends_at_the_first_line_that_is_not_a_field() -> None:
    top = read_entity("Subject: a\n folded\nFrom: x@y.example\nthis is body\nTo: not-a-field\n")
    assert top.get("subject") == "a\n folded" and top.get("to") is None
    assert top.body == "this is body\nTo: not-a-field\n"


def test_parameters_and_transfer_encodings() -> None:
    assert param('multipart/mixed; boundary="a;b \\"c\\""; x=1', "boundary") == 'a;b "c"'
    assert param("text/plain; name*0=ab; name*1=cd", "name") == "abcd"
    assert param("text/plain; title*=utf-8''caf%C3%A9", "title") == "café"
    part = read_entity("Content-Transfer-Encoding: base64\n\naGVsbG8gd29y\nbGQ\n")
    assert part.body_bytes() == b"hello world"
    assert decode_base64(b"aGVs!bG8=x") in (b"hello", b"hel")
    qp = read_entity("Content-Transfer-Encoding: quoted-printable\n\ncaf=C3=A9 =\nok\n")
    assert qp.body_bytes().decode() == "café ok\n"


@settings(max_examples=150, deadline=None)
@given(
    boundary=st.text(alphabet="abcXYZ019'()+_,-./:=? ", min_size=1, max_size=70),
    parts=st.lists(st.text(alphabet="ab-\n: \t", max_size=200), max_size=10),
    close=st.booleans(),
)
def test_splitter_round_trips_generated_multiparts(boundary: str, parts: list[str], close: bool) -> None:
    boundary = boundary.strip() or "b"
    body = "".join(f"--{boundary}\n\n{p}\n" for p in parts) + (f"--{boundary}--\n" if close else "")
    top = read_entity(f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n' + body)
    if not parts:
        assert top.parts == [] if close else top.parts is None
        return
    assert top.parts is not None
    # Generated part text may itself contain boundary lines; never more parts than lines.
    assert 1 <= len(top.parts) <= body.count("\n")
    if not any(f"--{boundary}" in p for p in parts):
        expected = list(parts)
        if not close:
            expected[-1] += "\n"  # no closing line: the last part keeps its final LF
        assert [p.body for p in top.parts] == expected


# The phrase pre-filter (mtad.dsn.needles) must never hide a phrase that matches.
_FRAGMENTS = [f for _, frags in TABLE for f in frags]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_text_a_phrase_matches_contains_one_of_its_needles(data: st.DataObject) -> None:
    fragment = data.draw(st.sampled_from(_FRAGMENTS))
    needed = needles(_fast(fragment))
    assert needed is not None
    text = data.draw(st.from_regex(re.compile(fragment), fullmatch=True).map(str.lower))
    if re.search(_fast(fragment), text):
        assert any(n in text for n in needed), (fragment, text, needed)


def test_needles_of_tricky_patterns() -> None:
    assert needles("ab(?:c|)de") is None  # an empty alternative requires nothing
    assert needles("mail ?box full") == ("box full",)
    assert needles("(?:exceeded|reached) (?:the )?quota") == ("exceeded", "reached")
    assert needles("m(?<![a-z]m)ailbox (?:is )?full") == ("mailbox ",)
    assert needles("errors? x{2,3}found") == ("error",)
    assert needles("a|bcd") is None and needles("[") is None
