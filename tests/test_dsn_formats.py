"""The DSN parser over hand-written bounces in the documented formats of real MTAs and providers.

tests/data/dsn-formats/ holds one message per format or provider wording (Postfix, Exim,
Sendmail, qmail, Courier, Exchange 2003-2019, Office 365, Outlook.com, Gmail, Google
Workspace, Yahoo, Amazon SES, Domino, GroupWise, MDaemon, Zimbra, OpenSMTPD, IMail, Zoho,
Oracle Messaging Server, amavisd-new, Mimecast, Proofpoint, Barracuda, iCloud, and notices
worded in German, French, Spanish, Italian, Portuguese, Russian, Japanese, Chinese and
Korean), written from the formats' documentation, not copied from any bounce collection.
manifest.json gives the records each must produce: recipient, action, status, reason
(sisimai vocabulary) and class. Nothing else may come out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtad.dsn import classify_reply, parse
from mtad.dsn.classify import reply_code

FORMATS = Path(__file__).parent / "data" / "dsn-formats"
MANIFEST = json.loads((FORMATS / "manifest.json").read_text(encoding="utf-8"))["samples"]
FIELDS = ("recipient", "action", "status", "reason", "class")
HARD = {"userunknown", "hostunknown", "hasmoved"}

Row = tuple[str, str, str, str, str]


def _expected(name: str) -> list[Row]:
    return sorted(tuple(e[f] for f in FIELDS) for e in MANIFEST[name]["expected"])  # type: ignore[misc]


def _got(data: bytes) -> list[Row]:
    return sorted((r.recipient, r.action, r.status, r.reason, r.class_) for r in parse(data))


def _read(name: str, newline: bytes) -> bytes:
    return (FORMATS / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", newline)


def test_manifest_and_files_agree() -> None:
    on_disk = {p.name for p in FORMATS.glob("*.eml")}
    assert on_disk == set(MANIFEST)
    assert len(on_disk) >= 70
    for name, sample in MANIFEST.items():
        assert sample["format"], name
        assert sample["expected"], name
        for exp in sample["expected"]:
            assert set(exp) == set(FIELDS), name


def test_manifest_is_self_consistent() -> None:
    """Classes follow the reasons (hard only for the reasons that mean "never deliverable")."""
    for name, sample in MANIFEST.items():
        for exp in sample["expected"]:
            if exp["reason"] in HARD:
                assert exp["class"] == "hard", name
            elif exp["reason"] == "notaccept":
                assert exp["class"] == ("hard" if exp["status"].startswith("5") else "soft"), name
            else:
                assert exp["class"] == "soft", name
            assert exp["action"] in ("failed", "delayed"), name


def test_manifest_covers_the_reason_vocabulary() -> None:
    reasons = {e["reason"] for s in MANIFEST.values() for e in s["expected"]}
    wanted = {
        "userunknown", "hostunknown", "mailboxfull", "mesgtoobig", "blocked", "spamdetected", "policyviolation",
        "rejected", "expired", "suspend", "norelaying", "toomanyconn", "securityerror", "hasmoved", "notaccept",
        "systemfull", "virusdetected", "authfailure", "requireptr", "mailererror",
    }
    assert wanted <= reasons
    actions = {e["action"] for s in MANIFEST.values() for e in s["expected"]}
    assert actions == {"failed", "delayed"}


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_format_sample(name: str, newline: bytes) -> None:
    assert _got(_read(name, newline)) == _expected(name), MANIFEST[name]["format"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_format_sample_bare_cr(name: str) -> None:
    # Old Mac mail tools end lines with CR alone; 8-bit bodies keep their bytes.
    assert _got(_read(name, b"\r")) == _expected(name)


def _reply_records() -> list[tuple[str, str, str, str]]:
    """(sample, diagnostic, status, reason) of every record whose diagnostic is an SMTP reply."""
    out = []
    for name in sorted(MANIFEST):
        if not name.startswith("replies-"):
            continue
        for rec in parse((FORMATS / name).read_bytes()):
            if reply_code(rec.diagnostic):
                out.append((name, rec.diagnostic, rec.status, rec.reason))
    return out


REPLIES = _reply_records()


def test_reply_samples_are_there() -> None:
    assert len(REPLIES) >= 25


@pytest.mark.parametrize(("name", "diagnostic", "status", "reason"), REPLIES,
                         ids=[f"{r[0]}:{r[3]}:{i}" for i, r in enumerate(REPLIES)])
def test_same_reason_in_session(name: str, diagnostic: str, status: str, reason: str) -> None:
    # A reply seen synchronously by the delivery engine classifies as its later DSN does.
    got, klass = classify_reply(reply_code(diagnostic), status, diagnostic)
    assert got == reason, diagnostic
    assert klass == ("hard" if reason in HARD or reason == "notaccept" and status.startswith("5") else "soft")


def test_delay_notices_are_delays_not_failures() -> None:
    delayed = [n for n, s in MANIFEST.items() if any(e["action"] == "delayed" for e in s["expected"])]
    assert len(delayed) >= 6
    for name in delayed:
        for rec in parse((FORMATS / name).read_bytes()):
            assert rec.action == "delayed", name
            assert rec.class_ == "soft", name
            assert rec.status.startswith("4."), name
