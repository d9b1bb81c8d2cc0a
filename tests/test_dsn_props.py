"""Property tests: random and mutated messages never make the DSN parser raise or stall."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtad.dsn import DsnRecord, classify_reply, parse
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
