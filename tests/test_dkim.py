"""DKIM signing: canonicalisation, header choice, keys, mtactl dkim, and a real mtad's signatures
checked by verifiers that are not ours.

Independent verifiers: OpenDKIM's `opendkim-testmsg` (RSA and Ed25519; it asks the system
resolver, so it runs in a network and mount namespace of its own where /etc/resolv.conf points
at tests/dnsserver.py on that namespace's 127.0.0.1:53) and Perl Mail::DKIM (RSA only in
Debian 12's version; it is given tests/dnsserver.py on 127.0.0.1 through Net::DNS). Each is
skipped when absent; scripts/test installs both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mtad import dkim
from mtad.dkimverify import verify
from mtad.events import EventBus
from mtad.ingest import Ingest, Submission
from mtad.records import Recipient

sys.path.insert(0, str(Path(__file__).parent))
from dnsserver import DnsServer
from harness import MtadProcess, wait_for, write_config

TESTS = Path(__file__).parent
OPENDKIM = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my ($host, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$host], port => $port,
    recurse => 0, retry => 1, udp_timeout => 5, tcp_timeout => 5));
my $v = Mail::DKIM::Verifier->new();
binmode STDIN; local $/; my $msg = <STDIN>;
$v->PRINT($msg); $v->CLOSE;
print join(" ", $_->domain, $_->selector, $_->algorithm, $_->result), "\n" for $v->signatures;
"""
NETNS_VERIFY = r"""
set -e
ip link set lo up
printf 'nameserver 127.0.0.1\n' > "$DIR/resolv.conf"
mount --bind "$DIR/resolv.conf" /etc/resolv.conf
"$PY" "$TESTS/dnsserver.py" --port 53 --zone "$DIR/zone.json" > "$DIR/port" &
for _ in $(seq 200); do [ -s "$DIR/port" ] && break; sleep 0.02; done
set +e
"$OPENDKIM" < "$DIR/message.eml"
echo "rc=$?"
kill %1
"""


def _has_perl_dkim() -> bool:
    return shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e1"], capture_output=True, check=False).returncode == 0


def _has_netns_opendkim() -> bool:
    if not os.path.exists(OPENDKIM) or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, check=False).returncode == 0


needs_perl = pytest.mark.skipif(not _has_perl_dkim(), reason="Perl Mail::DKIM not installed (libmail-dkim-perl)")
needs_opendkim = pytest.mark.skipif(not _has_netns_opendkim(),
                                    reason="opendkim-testmsg, or unshare of a network namespace, not available")


def records_of(keys: list[dkim.SigningKey]) -> dict[str, str]:
    return {f"{k.selector}._domainkey.{k.domain}": k.record() for k in keys}


def opendkim_verify(message: bytes, records: dict[str, str], tmp: Path) -> tuple[int, str]:
    """opendkim-testmsg's verdict on MESSAGE: (exit status, its complaint)."""
    tmp.mkdir(exist_ok=True)
    (tmp / "message.eml").write_bytes(message)
    (tmp / "zone.json").write_text(json.dumps({name: {"TXT": [text]} for name, text in records.items()}))
    env = dict(os.environ, DIR=str(tmp), PY=sys.executable, TESTS=str(TESTS), OPENDKIM=OPENDKIM)
    run = subprocess.run(["unshare", "--net", "--mount", "bash", "-c", NETNS_VERIFY], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"rc=(\d+)", run.stdout)
    assert match, run.stdout + run.stderr
    return int(match[1]), run.stdout + run.stderr


def perl_verify(message: bytes, records: dict[str, str]) -> list[str]:
    """Mail::DKIM's result per signature: ["example.com s1 rsa-sha256 pass", ...]."""
    with DnsServer({name: {"TXT": [text]} for name, text in records.items()}) as server:
        run = subprocess.run(["perl", "-e", PERL_VERIFIER, server.host, str(server.port)], input=message,
                             capture_output=True, timeout=30, check=True)
    return run.stdout.decode().splitlines()


# -- messages ------------------------------------------------------------------------------

def _headers(subject: bytes = b"Hello") -> bytes:
    return (b"From: \"Ann Example\" <ann@mail.example.com>\r\n"
            b"To: Bob <bob@example.net>,\r\n  carol@example.net,\r\n\tdave@example.net\r\n"
            b"Subject: " + subject + b"\r\n"
            b"Date: Mon, 02 Jan 2006 15:04:05 +0000\r\n"
            b"Message-ID: <m1@mail.example.com>\r\nMIME-Version: 1.0\r\n")


def message_8bit() -> bytes:
    body = "Grüße aus Köln — naïve café\r\n  indented\t\ttabs   \r\n\r\n\r\n".encode()
    return _headers() + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body


def message_folded() -> bytes:
    subject = b"A very long subject line that goes on and on" + b"".join(
        b"\r\n\t and on, folded again number %d with  double  spaces" % i for i in range(12))
    return _headers(subject) + b"List-Unsubscribe: <https://example.com/u/123456789>,\r\n <mailto:u@example.com>\r\n\r\nBody.\r\n"


def message_multipart() -> bytes:
    attachment = hashlib.sha512(b"seed").digest() * 300
    import base64
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (_headers() + b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee the file.  \r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=x.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b1--\r\n")


MESSAGES = {"8bit": message_8bit, "folded": message_folded, "multipart": message_multipart}


@pytest.fixture(scope="module")
def keys() -> list[dkim.SigningKey]:
    return [dkim.SigningKey("example.com", "r1", dkim.generate_key("rsa")),
            dkim.SigningKey("example.com", "e1", dkim.generate_key("ed25519"))]


def signed(message: bytes, key_list: list[dkim.SigningKey], now: float = 1_700_000_000) -> bytes:
    end = message.index(b"\r\n\r\n") + 2
    fields = dkim.sign_message({"example.com": key_list}, dkim.SignPolicy(), message[:end], message, end + 2, now)
    assert len(fields) == len(key_list)
    return b"".join(fields) + message


# -- pure parts ----------------------------------------------------------------------------

_line = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"  "]), max_size=8).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_line, max_size=12), st.booleans(), st.integers(min_value=1, max_value=40))
def test_body_hash_matches_dkimpy_relaxed(lines: list[bytes], terminated: bool, chunk: int) -> None:
    body = b"\r\n".join(lines) + (b"\r\n" if terminated and lines else b"")
    expected = hashlib.sha256(Relaxed.canonicalize_body(body)).digest()
    assert dkim.relaxed_body_hash(b"xx" + body, 2, chunk_size=chunk) == expected


def test_relaxed_header_unfolds_and_squeezes() -> None:
    assert dkim.relaxed_header(b"SubJect", b" \ta  b\r\n\t c \r\n") == b"subject:a b c\r\n"


def test_header_list_oversigns_from_and_absent_names() -> None:
    fields = dkim.header_fields(b"From: a@x.test\r\nTo: b@y.test\r\nX-Other: 1\r\nDate: now\r\nTo: c@y.test\r\n")
    h = dkim.header_list(fields, ["From", "To", "Date", "Reply-To", "Cc"], ["From", "Reply-To"])
    assert h == ["from", "from", "to", "to", "date", "reply-to"]


def test_signing_domain_is_author_domain_or_nearest_parent_with_keys() -> None:
    assert dkim.signing_domain("a.b.example.com", {"example.com", "b.example.com"}.__contains__) == "b.example.com"
    assert dkim.signing_domain("mail.example.com", {"example.com"}.__contains__) == "example.com"
    assert dkim.signing_domain("example.org", {"example.com", "org"}.__contains__) is None


def test_no_key_no_from_no_signature(keys: list[dkim.SigningKey]) -> None:
    by_domain = {"example.com": keys}
    other = b"From: x@example.org\r\n"
    assert dkim.sign_message(by_domain, dkim.SignPolicy(), other, other + b"\r\nhi\r\n", len(other) + 2, 0) == []
    no_from = b"To: x@example.com\r\n"
    assert dkim.sign_message(by_domain, dkim.SignPolicy(), no_from, no_from, len(no_from), 0) == []


def test_signature_tags(keys: list[dkim.SigningKey]) -> None:
    field = signed(message_8bit(), keys[:1]).split(b"\r\nFrom:")[0].decode()
    flat = re.sub(r"\s+", "", field)
    assert "a=rsa-sha256" in flat and "c=relaxed/relaxed" in flat and "d=example.com" in flat
    assert "t=1700000000" in flat and ";l=" not in flat and "s=r1" in flat
    assert "h=from:from:to:to:subject:subject:date:message-id:mime-version:content-type:content-transfer-encoding;" in flat
    assert max(len(line) for line in field.split("\r\n")) <= 78


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_our_verifier_agrees(keys: list[dkim.SigningKey], name: str) -> None:
    message = signed(MESSAGES[name](), keys)
    results = verify(message, records_of(keys).get)
    assert [(r.result, r.selector) for r in results] == [("pass", "r1"), ("pass", "e1")]
    # a second From above the signed one breaks every signature (oversigned From)
    forged = b"From: evil@example.org\r\n" + message
    assert {r.result for r in verify(forged, records_of(keys).get)} == {"fail"}


# -- independent verifiers -----------------------------------------------------------------

@needs_perl
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_mail_dkim_verifies_rsa(keys: list[dkim.SigningKey], name: str) -> None:
    message = signed(MESSAGES[name](), keys[:1])
    assert perl_verify(message, records_of(keys)) == ["example.com r1 rsa-sha256 pass"]
    assert perl_verify(message + b"more\r\n", records_of(keys)) == ["example.com r1 rsa-sha256 fail"]


@needs_opendkim
@pytest.mark.parametrize("key_index", [0, 1], ids=["rsa", "ed25519"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_opendkim_verifies(keys: list[dkim.SigningKey], name: str, key_index: int, tmp_path: Path) -> None:
    message = signed(MESSAGES[name](), [keys[key_index]])
    status, said = opendkim_verify(message, records_of(keys), tmp_path / "ok")
    assert status == 0, said
    status, said = opendkim_verify(message.replace(b"Subject: ", b"Subject: Re: ", 1), records_of(keys), tmp_path / "bad")
    assert status != 0 and "signature" in said.lower(), said


# -- keys and mtactl dkim ------------------------------------------------------------------

def mtactl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtad.mtactl.main", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_genkey_writes_0600_prints_record_refuses_overwrite(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    made = mtactl(config, "dkim", "genkey", "Example.COM", "--selector", "s2026")
    assert made.returncode == 0, made.stderr
    path = tmp_path / "spool" / "dkim" / "example.com" / "s2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "mtad not reached" in made.stderr
    line = made.stdout.splitlines()[-1]
    match = re.fullmatch(r's2026\._domainkey\.example\.com\. IN TXT \( ((?:"[^"]*" ?)+)\)', line)
    assert match, line
    strings = re.findall(r'"([^"]*)"', match[1])
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    (key,) = dkim.load_keys(tmp_path / "spool" / "dkim")[0]["example.com"]
    assert "".join(strings) == key.record() and key.bits == 2048 and key.algorithm == "rsa-sha256"

    again = mtactl(config, "dkim", "genkey", "example.com", "--selector", "s2026")
    assert again.returncode == 1 and "already has a key" in again.stderr
    assert dkim.load_keys(tmp_path / "spool" / "dkim")[0]["example.com"][0].public_key_b64() == key.public_key_b64()
    forced = mtactl(config, "dkim", "genkey", "example.com", "--selector", "s2026", "--force", "--algorithm", "ed25519")
    assert forced.returncode == 0 and 'k=ed25519; p=' in forced.stdout
    assert mtactl(config, "dkim", "genkey", "example.com", "--selector", "x", "--bits", "1024").returncode == 2
    assert mtactl(config, "dkim", "genkey", "example.com", "--selector", "bad_sel").returncode == 1


def test_key_loading_skips_retired_and_broken_files(tmp_path: Path) -> None:
    for selector in ("a", "b"):
        dkim.write_key(tmp_path, "example.com", selector, dkim.generate_key("ed25519"))
    (tmp_path / "example.com" / "b.key").rename(tmp_path / "example.com" / "b.key.retired")
    (tmp_path / "example.com" / "junk.key").write_text("not a key")
    keys, problems = dkim.load_keys(tmp_path)
    assert [k.selector for k in keys["example.com"]] == ["a"]
    assert len(problems) == 1 and "junk.key" in problems[0]


def test_dkim_check_against_dns(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    published = dkim.generate_key("rsa")
    dkim.write_key(key_dir, "example.com", "good", published)
    dkim.write_key(key_dir, "example.com", "stale", dkim.generate_key("ed25519"))
    dkim.write_key(key_dir, "example.com", "absent", dkim.generate_key("ed25519"))
    good = dkim.SigningKey("example.com", "good", published)
    other = dkim.SigningKey("example.com", "stale", dkim.generate_key("ed25519"))
    zone = {"good._domainkey.example.com": {"TXT": [good.record()]},
            "stale._domainkey.example.com": {"TXT": [other.record()]}}
    with DnsServer(zone) as server:
        config = write_config(tmp_path, extra=f'[dns]\nnameservers = ["{server.address}"]\ntimeout = "2s"\n'
                                              f'[dkim]\nkey_dir = "{key_dir}"\n')
        one = mtactl(config, "dkim", "check", "example.com", "--selector", "good")
        assert one.returncode == 0, one.stderr
        assert one.stdout.strip() == "good._domainkey.example.com: ok: published and matching"
        every = mtactl(config, "--json", "dkim", "check", "example.com")
        assert every.returncode == 1
        status = {row["selector"]: row["status"] for row in map(json.loads, every.stdout.splitlines())}
        assert status == {"absent": "missing", "good": "ok", "stale": "different"}
        none = mtactl(config, "dkim", "check", "example.org")
        assert none.returncode == 1 and "no signing key" in none.stderr


# -- ingest and a real daemon --------------------------------------------------------------

class _Spool:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def store(self, envelope: object, recipients: object, body: bytes | memoryview) -> None:
        self.bodies.append(bytes(body))


@pytest.mark.asyncio
async def test_ingest_signs_added_fields_not_received(tmp_path: Path, keys: list[dkim.SigningKey]) -> None:
    for key in keys:
        dkim.write_key(tmp_path, key.domain, key.selector, key.private)
    signer = dkim.DkimSigner(str(tmp_path), dkim.SignPolicy(listeners=frozenset({"submission"})))
    signer.reload()
    spool = _Spool()
    ingest = Ingest(spool, EventBus(), "mx.test", signer=signer)
    body = bytearray(b"From: ann@example.com\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nhello\r\n")
    recipients = [Recipient(address="bob@example.net")]
    await ingest.accept(Submission(sender="ann@example.com", recipients=recipients, body=body,
                                   listener="submission", received=b"Received: from x by mx.test\r\n"))
    await ingest.accept(Submission(sender="ann@example.com", recipients=recipients, body=b"From: ann@example.com\r\n\r\nx\r\n",
                                   listener="mx", received=b"Received: from y by mx.test\r\n"))
    await asyncio.to_thread(signer.close)
    stored, unsigned = spool.bodies
    names = [line.split(b":")[0] for line in stored.split(b"\r\n\r\n")[0].split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:5] == [b"Received", b"DKIM-Signature", b"DKIM-Signature", b"Message-ID", b"Date"]
    assert b"h=from:from:to:to:subject:subject:date:message-id;" in re.sub(rb"\s+", b"", stored)
    assert [r.result for r in verify(stored, records_of(keys).get)] == ["pass", "pass"]
    assert b"DKIM-Signature" not in unsigned  # mx mail is not signed by this policy


@pytest.mark.slow
@needs_opendkim
def test_daemon_signs_and_reloads_keys(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='[dkim]\nsign = ["mx"]\n')
    assert mtactl(config, "dkim", "genkey", "example.test", "--selector", "one").returncode == 0
    proc = MtadProcess(config).start()
    try:
        made = mtactl(config, "dkim", "genkey", "example.test", "--selector", "two", "--algorithm", "ed25519")
        assert made.returncode == 0 and "1 domain" in made.stderr, made.stderr
        message = message_multipart().replace(b"mail.example.com", b"example.test")
        with smtplib.SMTP(*proc.mx, timeout=30) as client:
            client.sendmail("ann@example.test", ["bob@example.test"], message)
        (entry,) = wait_for(proc.queue_json)
        stored = proc.mtactl("queue", "cat", entry["id"]).stdout
        # a retired key stops signing at the next SIGHUP
        retired = tmp_path / "spool" / "dkim" / "example.test" / "two.key"
        retired.rename(retired.with_name("two.key.retired"))
        proc.signal(signal.SIGHUP)
        wait_for(lambda: any(r.get("event") == "dkim.keys_loaded" and r.get("keys") == 1 for r in proc.records()))
        with smtplib.SMTP(*proc.mx, timeout=30) as client:
            client.sendmail("ann@example.test", ["bob@example.test"], message)
        later = wait_for(lambda: [e for e in proc.queue_json() if e["id"] != entry["id"]])
        assert proc.mtactl("queue", "cat", later[0]["id"]).stdout.count(b"\r\nDKIM-Signature: ") == 1
    finally:
        assert proc.stop() == 0
    assert stored.startswith(b"Received: ")
    assert stored.count(b"\r\nDKIM-Signature: ") == 2
    keys = dkim.load_keys(tmp_path / "spool" / "dkim")[0]["example.test"]
    status, said = opendkim_verify(stored, records_of(keys), tmp_path / "v")
    assert status == 0, said
    if _has_perl_dkim():
        assert "example.test one rsa-sha256 pass" in perl_verify(stored, records_of(keys))
    for key in keys:  # each signature on its own, so one good one cannot hide a bad one
        status, said = opendkim_verify(stored, records_of([key]), tmp_path / key.selector)
        assert status == 0, said
