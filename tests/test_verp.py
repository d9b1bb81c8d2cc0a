"""VERP return paths: token round trip, forged and tampered tags refused, limits, the key file."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.config import loads_config
from mtad.platform import verp as verp_module
from mtad.platform.verp import (
    MAX_LOCAL_PART,
    Verp,
    VerpKeyError,
    load_key,
    verp_from_config,
    wants_verp,
)
from mtad.records import Envelope, new_queue_id

KEY = b"k" * 32
QUEUE_ID = "0123456789abcdef012345"


def envelope(**fields: object) -> Envelope:
    base: dict[str, object] = {"id": QUEUE_ID, "sender": "news@acme.test", "arrival_time": 0.0, "size": 1,
                               "listener": "submission", "tenant": "acme"}
    base.update(fields)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    codec = Verp("Bounce.Example.", KEY)
    address = codec.address(QUEUE_ID)
    local, _, domain = address.partition("@")
    assert domain == "bounce.example"
    assert local.startswith("bounces+" + QUEUE_ID + "-") and len(local) == 47 <= MAX_LOCAL_PART
    assert codec.parse(local) == QUEUE_ID
    assert codec.parse(local.upper()) == QUEUE_ID  # a relay that shouted the address
    assert codec.claims(address) == QUEUE_ID
    assert codec.claims(local + "@BOUNCE.example.") == QUEUE_ID
    assert codec.claims(local + "@other.example") is None
    fresh = new_queue_id()
    assert codec.parse(codec.local_part(fresh)) == fresh


@given(st.text(max_size=80))
def test_random_local_parts_never_parse(text: str) -> None:
    assert Verp("b.test", KEY).parse(text) is None


def test_tampered_and_forged_tags_are_refused() -> None:
    codec = Verp("b.test", KEY)
    local = codec.local_part(QUEUE_ID)
    tag = local.rpartition("-")[2]
    for i in range(len(tag)):  # every single-character change of the tag
        flipped = tag[:i] + ("a" if tag[i] != "a" else "b") + tag[i + 1:]
        assert codec.parse(local[:-len(tag)] + flipped) is None
    other_id = QUEUE_ID[:-1] + "6"
    assert codec.parse(f"bounces+{other_id}-{tag}") is None  # the tag is bound to the queue id
    assert Verp("b.test", b"x" * 32).parse(local) is None  # another key
    for bad in ("", "bounces+", f"bounces+{QUEUE_ID}", f"bounces+{QUEUE_ID}{tag}", f"bounce+{QUEUE_ID}-{tag}",
                f"bounces+{QUEUE_ID}-{tag}x", f"bounces+{QUEUE_ID}-{tag[:-1]}", f"bounces+{QUEUE_ID}x-{tag}",
                f"bounces+{QUEUE_ID}-{tag[:-1]}1", f"bounces+{QUEUE_ID}--{tag}", "bounces+" + "a" * 80,
                "postmaster"):
        assert codec.parse(bad) is None, bad


def test_tags_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(verp_module.hmac, "compare_digest", spy)
    codec = Verp("b.test", KEY)
    local = codec.local_part(QUEUE_ID)
    assert codec.parse(local) == QUEUE_ID
    assert codec.parse(local[:-1] + ("a" if local[-1] != "a" else "b")) is None
    assert len(calls) == 2 and all(len(a) == len(b) == 16 for a, b in calls)


def test_limits() -> None:
    with pytest.raises(ValueError):
        Verp("b.test", b"short")
    with pytest.raises(ValueError):
        Verp("", KEY)
    with pytest.raises(ValueError):
        Verp("b.test", KEY).local_part("not-a-queue-id")


def test_which_mail_gets_a_return_path() -> None:
    codec = Verp("b.test", KEY)
    assert codec.return_path(envelope()) == codec.address(QUEUE_ID)
    assert codec.return_path(envelope(listener="http")) == codec.address(QUEUE_ID)
    assert codec.return_path(envelope(listener="submissions", tenant="")) == codec.address(QUEUE_ID)
    assert codec.return_path(envelope(sender="")) == ""  # never the null sender
    assert codec.return_path(envelope(listener="mx", tenant="")) == "news@acme.test"  # relayed from mx
    assert codec.return_path(envelope(listener="mx", tenant="acme")) == "news@acme.test"
    assert codec.return_path(envelope(listener="dsn", tenant="", sender="")) == ""
    assert not wants_verp("a@b.test", "", "")  # re-injected, no tenant
    assert wants_verp("a@b.test", "", "acme")


def test_key_file_is_made_once_private(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    key = load_key(str(spool))
    path = spool / "verp.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(str(spool)) == key
    os.chmod(path, 0o644)
    if os.geteuid() != 0:
        with pytest.raises(VerpKeyError, match="readable by group or others"):
            load_key(str(spool))


def test_from_config(tmp_path: Path) -> None:
    assert verp_from_config(loads_config("", base_dir=tmp_path)) is None
    cfg = loads_config(f'[server]\nspool_dir = "{tmp_path}/s"\n[bounces]\ndomain = "B.test"\n', base_dir=tmp_path)
    made = verp_from_config(cfg)
    assert made is not None and made.domain == "b.test"
    again = verp_from_config(cfg)
    assert again is not None and again.parse(made.local_part(QUEUE_ID)) == QUEUE_ID  # same key file
    given_secret = loads_config('[bounces]\ndomain = "b.test"\nsecret = "0123456789abcdef"\n', base_dir=tmp_path)
    fixed = verp_from_config(given_secret)
    assert fixed is not None and fixed.parse(made.local_part(QUEUE_ID)) is None
    assert Verp("b.test", b"0123456789abcdef").parse(fixed.local_part(QUEUE_ID)) == QUEUE_ID
