"""The DSN parser over the shared corpora (sisimai's bounces, RFC 5965 complaint reports).

A small scorer of our own reads manifest.json (grade.py is not imported: it may change) and
checks the metrics stay at or above the levels reached, minus a small margin. Skips when
the corpus is absent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtad.dsn import DsnRecord, parse

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
BOUNCES = CORPUS / "bounces" / "manifest.json"
ARF = CORPUS / "arf" / "manifest.json"
NEGATIVE_TIERS = {"NEG", "FLUFL-NEG"}
ALIASES = {"ratelimited": "toomanyconn", "speeding": "toomanyconn", "emailtoolarge": "mesgtoobig",
           "onhold": "undefined", "unknown": "undefined"}

# Levels reached when this test was written (grade.py agrees), minus a margin of ~2 points.
FLOORS = {"recall": 96.0, "precision": 96.0, "f1": 96.0, "hard_soft": 95.5, "reason": 88.5, "status": 97.0}


def _norm_reason(reason: str | None) -> str:
    r = re.sub(r"[^a-z0-9]", "", (reason or "").lower())
    return ALIASES.get(r, r)


@dataclass
class Tally:
    counts: dict[str, list[int]] = field(default_factory=dict)
    false_records: int = 0
    crashes: list[str] = field(default_factory=list)

    def add(self, name: str, good: bool) -> None:
        ok_n = self.counts.setdefault(name, [0, 0])
        ok_n[0] += int(good)
        ok_n[1] += 1

    def pct(self, name: str) -> float:
        ok, n = self.counts.get(name, [0, 0])
        return 100.0 * ok / n if n else float("nan")


def _samples(manifest: Path) -> Iterator[tuple[str, dict, bytes]]:
    data = json.loads(manifest.read_text())
    tiers = set(data.get("default_scored_tiers") or {s["tier"] for s in data["samples"].values()})
    for sid, sample in data["samples"].items():
        if sample["tier"] in tiers:
            yield sid, sample, (manifest.parent / sample["file"]).read_bytes()


def _score_sample(tally: Tally, sample: dict, got: list[DsnRecord]) -> None:
    if sample["tier"] in NEGATIVE_TIERS or sample.get("kind") == "not-bounce":
        tally.false_records += len(got)
        return
    used: set[int] = set()
    for exp in sample["expected"]:
        names = {exp["recipient"].lower()} | {a.lower() for a in exp.get("recipient_alt") or []}
        hit = next((i for i, r in enumerate(got) if i not in used and r.recipient.lower() in names), None)
        tally.add("recall", hit is not None)
        if hit is None:
            continue
        used.add(hit)
        rec = got[hit]
        if exp.get("status") and not exp.get("status_pseudo"):
            tally.add("status", rec.status == exp["status"])
        if exp.get("class") in ("hard", "soft"):
            good = rec.class_ == exp["class"] or (_norm_reason(exp["reason"]) == "undefined" and rec.class_ == "unknown")
            tally.add("hard_soft", good)
        if exp.get("reason"):
            tally.add("reason", _norm_reason(rec.reason) == _norm_reason(exp["reason"]))
    for i in range(len(got)):
        tally.add("precision", i in used)


@pytest.fixture(scope="module")
def bounce_tally() -> Tally:
    if not BOUNCES.exists():
        pytest.skip("bounce corpus not available")
    tally = Tally()
    for sid, sample, data in _samples(BOUNCES):
        try:
            got = parse(data)
        except Exception as exc:  # noqa: BLE001 - parse() promises never to raise; record, then fail below
            tally.crashes.append(f"{sid}: {exc!r}")
            continue
        _score_sample(tally, sample, got)
    return tally


def test_bounce_corpus_recipients(bounce_tally: Tally) -> None:
    recall, precision = bounce_tally.pct("recall"), bounce_tally.pct("precision")
    f1 = 2 * recall * precision / (recall + precision)
    assert recall >= FLOORS["recall"], bounce_tally.counts["recall"]
    assert precision >= FLOORS["precision"], bounce_tally.counts["precision"]
    assert f1 >= FLOORS["f1"]


def test_bounce_corpus_classes_and_reasons(bounce_tally: Tally) -> None:
    assert bounce_tally.pct("hard_soft") >= FLOORS["hard_soft"], bounce_tally.counts["hard_soft"]
    assert bounce_tally.pct("reason") >= FLOORS["reason"], bounce_tally.counts["reason"]
    assert bounce_tally.pct("status") >= FLOORS["status"], bounce_tally.counts["status"]


def test_bounce_corpus_no_crashes_and_clean_negatives(bounce_tally: Tally) -> None:
    assert bounce_tally.crashes == []
    assert bounce_tally.false_records == 0


def test_every_sample_parses_fast() -> None:
    if not BOUNCES.exists():
        pytest.skip("bounce corpus not available")
    worst = 0.0
    for _, _, data in _samples(BOUNCES):
        start = time.perf_counter()
        parse(data)
        worst = max(worst, time.perf_counter() - start)
    assert worst < 0.5


def test_arf_corpus_complaints() -> None:
    if not ARF.exists():
        pytest.skip("ARF corpus not available")
    checked = 0
    for sid, sample, data in _samples(ARF):
        got = parse(data)
        exp = sample["expected"][0]
        rcpt = (exp.get("original_rcpt_to") or "").strip("<>").lower()
        if rcpt:
            assert [r.recipient.lower() for r in got] == [rcpt], sid
        for rec in got:
            assert (rec.reason, rec.class_) == ("feedback", "complaint"), sid
            assert rec.feedback_type == exp["feedback_type"], sid
            assert rec.source_ip == (exp.get("source_ip") or ""), sid
            checked += 1
    assert checked >= 4
