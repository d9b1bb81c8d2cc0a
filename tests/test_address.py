"""mtad.address: RFC 5321 path parsing, domain normalisation and the relay verdict (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtad.address import (
    AddressError,
    Mailbox,
    Verdict,
    classify_recipient,
    normalize_domain,
    normalize_domains,
    parse_path,
    split_path,
)

PARSED = [
    ("<user@example.test>", False, "user@example.test"),
    ("<USER@EXAMPLE.TEST>", False, "USER@example.test"),  # local parts keep their case
    ("<user@example.test.>", False, "user@example.test"),
    ("user@example.test", False, "user@example.test"),
    ("<first.last+tag@example.test>", False, "first.last+tag@example.test"),
    ("<!#$%&'*+-/=?^_`{|}~@example.test>", False, "!#$%&'*+-/=?^_`{|}~@example.test"),
    ('<"john doe"@example.test>', False, '"john doe"@example.test'),
    ('<"a\\"b"@example.test>', False, '"a\\"b"@example.test'),
    ('<"a>b"@example.test>', False, '"a>b"@example.test'),
    ("<@relay.test:user@example.test>", False, "user@example.test"),
    ("<@a.test,@b.test:user@example.test>", False, "user@example.test"),
    ("<user@[192.0.2.1]>", False, "user@[192.0.2.1]"),
    ("<user@[IPv6:2001:DB8:0:0::1]>", False, "user@[IPv6:2001:db8::1]"),
    ("<user@ÉXAMPLE.test>", True, "user@xn--xample-9ua.test"),
    ("<jörg@bücher.test>", True, "jörg@xn--bcher-kva.test"),
    ('<"jö rg"@example.test>', True, '"jö rg"@example.test'),
]


@pytest.mark.parametrize(("path", "smtputf8", "expected"), PARSED)
def test_parse_path(path: str, smtputf8: bool, expected: str) -> None:
    mailbox = parse_path(path, smtputf8=smtputf8, null_ok=False)
    assert str(mailbox) == expected


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", smtputf8=False, null_ok=True) is None
    with pytest.raises(AddressError):
        parse_path("<>", smtputf8=False, null_ok=False)
    with pytest.raises(AddressError):
        parse_path("", smtputf8=False, null_ok=True)


BAD = ["<user>", "<@example.test>", "<user@>", "<user@@example.test>", "<.user@example.test>",
       "<user.@example.test>", "<us..er@example.test>", "<user@exa mple.test>", "<user@-bad.test>",
       "<user@bad-.test>", "<user@example..test>", "<user@example.test..>", "<user@1.2.3.4>",
       "<user@[1.2.3]>", "<user@[IPv6:zz::1]>", "<user@[tag:stuff]>", "<user@example.test",
       "user@example.test>", "<", '<"unterminated@example.test>', '<"a"b@example.test>',
       '<"a\x01"@example.test>', "<us(er@example.test>", "<user@exa_mple.test>",
       "<@relay.test user@example.test>", "<relay.test:user@example.test>", "<a@" + "b" * 64 + ".test>",
       "<" + "a" * 256 + "@example.test>", "<a@" + ".".join(["abcdefgh"] * 40) + ">"]


@pytest.mark.parametrize("path", BAD)
def test_bad_syntax(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, smtputf8=True, null_ok=True)
    assert not info.value.non_ascii


@pytest.mark.parametrize("path", ["<jörg@example.test>", "<user@bücher.test>", '<"jö"@example.test>'])
def test_non_ascii_without_smtputf8_is_its_own_error(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, smtputf8=False, null_ok=False)
    assert info.value.non_ascii


def test_split_path_separates_parameters() -> None:
    assert split_path("<a@b.test> SIZE=10  BODY=8BITMIME") == ("<a@b.test>", "SIZE=10  BODY=8BITMIME")
    assert split_path('<"x> y"@b.test> RET=HDRS') == ('<"x> y"@b.test>', "RET=HDRS")
    assert split_path("a@b.test SIZE=1") == ("a@b.test", "SIZE=1")
    assert split_path(" <> ") == ("<>", "")
    for bad in ("<a@b.test>SIZE=1", "<a@b.test", '<"a>@b.test'):
        with pytest.raises(AddressError):
            split_path(bad)


def test_normalize_domain() -> None:
    assert normalize_domain("Example.TEST.") == "example.test"
    assert normalize_domain("ÉXAMPLE.test") == "xn--xample-9ua.test"
    assert normalize_domain("straße.test") == "xn--strae-oqa.test"  # IDNA 2008, not 2003's "strasse"
    with pytest.raises(AddressError):
        normalize_domain("bücher.test", smtputf8=False)
    assert normalize_domains(["Local.Test", "bücher.test"]) == frozenset({"local.test", "xn--bcher-kva.test"})
    with pytest.raises(AddressError, match="bad_domain"):
        normalize_domains(["bad_domain"])


LOCAL = frozenset({"local.test"})
VERDICTS = [
    (Mailbox("user", "local.test"), Verdict.LOCAL),
    (Mailbox('"john doe"', "local.test"), Verdict.LOCAL),
    (Mailbox("user", "ext.test"), Verdict.RELAY),
    (Mailbox("user", "[127.0.0.1]"), Verdict.RELAY),
    (Mailbox("user%ext.test", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("ext.test!user", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox('"user@ext.test"', "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox('"user\\@ext.test"', "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("user%ext.test", "ext.test"), Verdict.RELAY),
    # NFKC look-alikes of %, ! and @ route mail at any hop that folds them
    (Mailbox("user\uff05ext.test", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("ext.test\uff01user", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("user\uff20ext.test", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("user\ufe6aext.test", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("ext.test\ufe57user", "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox('"user\ufe6bext.test"', "local.test"), Verdict.ROUTING_LOCAL_PART),
    (Mailbox("jörg", "local.test"), Verdict.LOCAL),
]


def test_rfc5321_size_limits_are_exact() -> None:
    # 4.5.3.1.1: local part 64 octets (UTF-8 octets, not characters)
    assert parse_path("<" + "a" * 64 + "@b.test>", smtputf8=False, null_ok=False) is not None
    assert parse_path("<" + "ö" * 32 + "@b.test>", smtputf8=True, null_ok=False) is not None
    for local in ("a" * 65, "ö" * 32 + "a", '"' + "a" * 63 + '"'):
        with pytest.raises(AddressError):
            parse_path(f"<{local}@b.test>", smtputf8=True, null_ok=False)
    # 4.5.3.1.2: domain 255 octets
    domain = ".".join(["d" * 63] * 3 + ["e" * 61])  # 253 octets
    assert normalize_domain(domain) == domain
    with pytest.raises(AddressError):
        normalize_domain(domain + "e" * 3)
    # 4.5.3.1.3: path 256 octets, brackets included, with or without the brackets sent
    route = "@" + ".".join(["r" * 60] * 3) + ".test:"
    path = "<" + route + "b" * 52 + "@example.test>"
    assert len(path) == 256 and parse_path(path, smtputf8=False, null_ok=False) is not None
    with pytest.raises(AddressError, match="too long"):
        parse_path(path.replace("<", "<b"), smtputf8=False, null_ok=False)
    with pytest.raises(AddressError, match="too long"):
        parse_path(path[1:-1] + "b", smtputf8=False, null_ok=False)


def test_an_empty_quoted_local_part_names_nobody() -> None:
    with pytest.raises(AddressError, match="empty local part"):
        parse_path('<""@local.test>', smtputf8=False, null_ok=False)
    assert str(parse_path('<" "@local.test>', smtputf8=False, null_ok=False)) == '" "@local.test'


@pytest.mark.parametrize(("mailbox", "verdict"), VERDICTS, ids=[str(m) for m, _ in VERDICTS])
def test_classify_recipient(mailbox: Mailbox, verdict: Verdict) -> None:
    assert classify_recipient(mailbox, LOCAL) is verdict


@given(st.text(max_size=80), st.booleans())
def test_any_text_parses_or_raises_address_error(text: str, smtputf8: bool) -> None:
    try:
        mailbox = parse_path(text, smtputf8=smtputf8, null_ok=True)
    except AddressError:
        return
    if mailbox is not None:
        # Normalising is idempotent: the printed form parses back to itself.
        assert parse_path(f"<{mailbox}>", smtputf8=True, null_ok=False) == mailbox


_atom = st.text(alphabet="abcXYZ019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


@given(st.lists(_atom, min_size=1, max_size=3), st.lists(_label, min_size=1, max_size=3), st.sampled_from(["", "."]))
def test_generated_valid_mailboxes_parse(atoms: list[str], labels: list[str], dot: str) -> None:
    local = ".".join(atoms)
    domain = ".".join(labels + ["test"])
    mailbox = parse_path(f"<{local}@{domain.upper()}{dot}>", smtputf8=False, null_ok=False)
    assert mailbox == Mailbox(local, domain)
    routing = any(ch in local for ch in "%!")
    expected = Verdict.ROUTING_LOCAL_PART if routing else Verdict.LOCAL
    assert mailbox is not None and classify_recipient(mailbox, frozenset({domain})) is expected
