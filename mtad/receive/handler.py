"""The SMTP dialog of one session: state, and the reply to each command.

Every method returns a typed Reply (or the EHLO lines) and the session (session.py) does the
writing, so this file is decision code: sequence checks, the transaction being built, relay
policy, limits, and at the final dot the hand-over to ingest. Refusals of a recipient or a
message publish a `rejected` event; syntax errors do not (they are noise, not mail).

On the submission roles the session authenticates (session.py, auth.py) and tells the dialog
the tenant (`authenticated`); from then on MAIL checks the sender's domain and the tenant's
quotas, RCPT relays anywhere up to the tenant's recipient limit, and the final dot checks the
From domains and the tenant's size limit, then charges the quota once the message is stored.

Trust: the peer's commands are hostile; its HELO name is recorded only after clean_helo.
RFCs: 5321 4.1.1 (commands and their order), 4.1.4 (sequence), 3.3 and 2920 3.1 (DATA after
failed RCPTs: 554), 4.5.3.1.8 (recipient limit), 3207 4 and 4.2 (STARTTLS and the state after
it), 1870 (SIZE), 4954 4 and 6 (AUTH advertised only inside TLS; 530 before it), 6409 (submission).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtad import reply
from mtad.config.schema import Limits
from mtad.events import Event, EventBus
from mtad.ingest import (
    Ingest,
    IngestError,
    Submission,
    header_section_end,
    rfc5322_date,
)
from mtad.receive import auth, policy
from mtad.receive.data import DataResult, check_message, protocol_name, received_header
from mtad.receive.policy import SUBMISSION_ROLES, MailRequest
from mtad.records import Recipient, new_queue_id
from mtad.reply import Reply

if TYPE_CHECKING:
    from mtad.platform.model import Tenant
    from mtad.platform.quotas import QuotaTracker
    from mtad.platform.verp import Verp


NO_SUCH_BOUNCE_ADDRESS = Reply(550, "5.1.1", "No such recipient")


@dataclass(frozen=True, slots=True)
class Settings:
    """What a session needs to know, swapped as a whole on reload (sessions keep theirs)."""

    hostname: str
    limits: Limits
    local_domains: frozenset[str]
    tls_context: ssl.SSLContext | None
    """ssl.SSLContext, or None when STARTTLS is not offered."""
    bounces: Verp | None = None
    """The VERP bounce domain and key: mx takes mail at that domain for valid tokens only."""


class Dialog:
    """One session's SMTP state machine. Sync except `finish_data`, which awaits ingest."""

    def __init__(self, *, settings: Settings, ingest: Ingest, bus: EventBus, role: str,
                 client_ip: str, tls: bool, clock: Callable[[], float],
                 quotas: QuotaTracker | None = None) -> None:
        self.settings = settings
        self._quotas = quotas
        self.submission = role in SUBMISSION_ROLES
        self.tenant: Tenant | None = None
        """The authenticated tenant (submission roles), None before AUTH."""
        self.username = ""
        self._ingest = ingest
        self._bus = bus
        self.role = role
        self.client_ip = client_ip
        self.tls = tls
        self._clock = clock
        self.helo = ""
        self.esmtp = False
        self.mail: MailRequest | None = None
        self.recipients: list[Recipient] = []
        self._seen: set[str] = set()
        self._rcpt_tried = False
        self.wasted = 0
        """Commands since the last accepted message that moved no mail (the session counts
        HELO, NOOP, RSET and kin; a RCPT that adds no recipient counts here)."""

    # -- session commands -------------------------------------------------------------------

    def greet(self, arg: str | None, *, extended: bool) -> Reply | bytes:
        """HELO / EHLO: both reset the transaction (RFC 5321 4.1.4)."""
        if not arg or not arg.strip(" "):
            return reply.BAD_SYNTAX
        self.reset()
        self.helo = policy.clean_helo(arg)
        self.esmtp = extended
        hostname = self.settings.hostname
        if not extended:
            return reply.Reply(250, "", hostname)
        return policy.ehlo_lines(hostname, max_size=self.settings.limits.max_message_size,
                                 tls_offered=self.settings.tls_context is not None and not self.tls,
                                 auth=auth.MECHANISMS if self.submission and self.tls and self.tenant is None else ())

    def authenticated(self, tenant: Tenant, username: str) -> None:
        """AUTH succeeded: the session now sends as `tenant`."""
        self.tenant = tenant
        self.username = username

    @property
    def max_message_size(self) -> int:
        """The size limit of this session's messages: the server's, or the tenant's if lower."""
        limit = self.settings.limits.max_message_size
        if self.tenant is not None and 0 < self.tenant.quota.max_message_size < limit:
            return self.tenant.quota.max_message_size
        return limit

    @property
    def max_recipients(self) -> int:
        limit = self.settings.limits.max_recipients
        if self.tenant is not None and 0 < self.tenant.quota.max_recipients < limit:
            return self.tenant.quota.max_recipients
        return limit

    def after_tls(self) -> None:
        """RFC 3207 4.2: after the handshake the client starts over with EHLO."""
        self.reset()
        self.helo = ""
        self.esmtp = False
        self.tls = True
        self.tenant = None
        self.username = ""

    def reset(self) -> None:
        self.mail = None
        self.recipients = []
        self._seen = set()
        self._rcpt_tried = False

    def starttls(self, arg: str | None) -> Reply | None:
        """STARTTLS: None to go ahead with the handshake, or the refusal (RFC 3207 4)."""
        if arg:
            return reply.BAD_SYNTAX
        if self.tls:
            return reply.TLS_ALREADY_ACTIVE
        if self.settings.tls_context is None:
            return reply.TLS_NOT_AVAILABLE
        if self.mail is not None:
            # The handshake would silently drop the transaction (RFC 3207 4.2); say so instead.
            return reply.TRANSACTION_IN_PROGRESS
        return None

    # -- the transaction ----------------------------------------------------------------------

    def mail_from(self, arg: str | None) -> Reply:
        if not self.helo:
            return reply.NEED_HELO
        if self.mail is not None:
            return reply.NESTED_MAIL
        if self.submission and self.tenant is None:
            return auth.AUTH_REQUIRED  # RFC 4954 6: 530 5.7.0 (RFC 6409 4.3: no anonymous submission)
        parsed = policy.parse_mail(arg, esmtp=self.esmtp, max_size=self.max_message_size)
        if isinstance(parsed, Reply):
            if parsed is reply.MESSAGE_TOO_BIG:
                self._rejected(parsed, sender_text(parsed_sender_guess(arg)), [])
            return parsed
        if self.tenant is not None:
            refusal = policy.sender_reply(parsed.sender, self.tenant)
            if refusal is None and self._quotas is not None:
                text = self._quotas.admit(self.tenant, now=self._clock())
                refusal = Reply(451, "4.7.1", text) if text is not None else None
            if refusal is not None:
                self._rejected(refusal, sender_text(parsed), [])
                return refusal
        self.mail = parsed
        return reply.SENDER_OK

    def rcpt_to(self, arg: str | None) -> Reply:
        if not self.helo:
            return reply.NEED_HELO
        if self.mail is None:
            return reply.NEED_MAIL
        self._rcpt_tried = True
        parsed = policy.parse_rcpt(arg, esmtp=self.esmtp, smtputf8=self.mail.smtputf8,
                                   hostname=self.settings.hostname)
        if isinstance(parsed, Reply):
            return parsed
        address = str(parsed.mailbox)
        bounces = self.settings.bounces
        if bounces is not None and self.role == "mx" and bounces.is_bounce_domain(parsed.mailbox.domain):
            # Only a signed token is a recipient there, so a forged bounce suppresses nobody.
            verdict = reply.RECIPIENT_OK if bounces.parse(parsed.mailbox.local) else NO_SUCH_BOUNCE_ADDRESS
        else:
            verdict = policy.recipient_reply(parsed.mailbox, role=self.role,
                                             local_domains=self.settings.local_domains,
                                             hostname=self.settings.hostname,
                                             authenticated=self.tenant is not None)
        if verdict is not reply.RECIPIENT_OK:
            self._rejected(verdict, sender_text(self.mail), [address])
            return verdict
        if address in self._seen:
            self.wasted += 1
            return reply.RECIPIENT_OK  # one delivery per address, however often it is named
        if len(self.recipients) >= self.max_recipients:
            self.wasted += 1
            self._rejected(reply.TOO_MANY_RECIPIENTS, sender_text(self.mail), [address])
            return reply.TOO_MANY_RECIPIENTS  # RFC 5321 4.5.3.1.10: 452, the client retries later
        self._seen.add(address)
        self.recipients.append(Recipient(address=address, notify=parsed.notify, orcpt=parsed.orcpt))
        return reply.RECIPIENT_OK

    def data_start(self, arg: str | None) -> Reply:
        if not self.helo:
            return reply.NEED_HELO
        if arg:
            return reply.BAD_SYNTAX
        if self.mail is None:
            return reply.NEED_MAIL
        if not self.recipients:
            # RFC 5321 3.3 and RFC 2920 3.1: after RCPTs that all failed (pipelined, the client
            # may not have looked yet), "no valid recipients"; with no RCPT at all, a sequence error.
            return reply.NO_VALID_RECIPIENTS if self._rcpt_tried else reply.NEED_RCPT
        return reply.START_DATA

    async def finish_data(self, result: DataResult) -> Reply:
        """After the final dot: check the message, hand it to ingest, return the reply."""
        mail = self.mail
        recipients = self.recipients
        self.reset()
        assert mail is not None
        limits = self.settings.limits
        checked = check_message(result, smtputf8=mail.smtputf8, max_received=limits.max_received_headers,
                                bare_newline=limits.bare_newline)
        sender = sender_text(mail)
        addresses = [r.address for r in recipients]
        tenant = self.tenant
        if not isinstance(checked, Reply) and tenant is not None:
            checked = self._tenant_checks(checked, result, tenant)
        if isinstance(checked, Reply):
            self._rejected(checked, sender, addresses, size=result.size)
            return checked
        now = self._clock()
        queue_id = new_queue_id(now)
        protocol = protocol_name(esmtp=self.esmtp, tls=self.tls, smtputf8=mail.smtputf8)
        if tenant is not None:
            protocol += "A"  # RFC 3848 (ESMTPA, ESMTPSA), RFC 6531 7.1 (UTF8SMTPSA)
        trace = received_header(
            helo=self.helo, ip=self.client_ip, hostname=self.settings.hostname, protocol=protocol,
            queue_id=queue_id, recipient=addresses[0] if len(addresses) == 1 else None,
            date=rfc5322_date(now),
        )
        submission = Submission(
            sender=sender, recipients=recipients, body=checked, client_address=self.client_ip,
            helo=self.helo, listener=self.role, protocol=protocol, smtputf8=mail.smtputf8,
            body_type=mail.body_type, ret=mail.ret, envid=mail.envid, received=trace,
            queue_id=queue_id, header_end=result.header_end, tenant=tenant.name if tenant else "",
        )
        try:
            await self._ingest.accept(submission)
        except IngestError as exc:
            return exc.reply  # ingest published the rejected event
        self.wasted = 0
        if tenant is not None and self._quotas is not None:
            self._quotas.charge(tenant, now=self._clock())
        return reply.queued(queue_id)

    def _tenant_checks(self, body: bytes | bytearray, result: DataResult, tenant: Tenant) -> bytes | bytearray | Reply:
        """At the final dot on submission: the tenant's size limit, then the From domains."""
        if result.size > self.max_message_size:
            return reply.MESSAGE_TOO_BIG
        end = result.header_end if result.header_end >= 0 else header_section_end(body)
        refusal = policy.from_reply(bytes(memoryview(body)[:end]), tenant)
        return body if refusal is None else refusal

    def auth_refused(self, refusal: Reply, *, username: str, reason: str) -> None:
        """A failed or refused AUTH, on the mail log (the username as claimed; never the password)."""
        self._bus.publish(Event(
            type="rejected", time=self._clock(), client_address=self.client_ip, helo=self.helo,
            listener=self.role, reply=str(refusal), reason=reason, user=auth.loggable_username(username),
        ))

    def _rejected(self, refusal: Reply, sender: str, recipients: list[str], size: int = 0) -> None:
        self._bus.publish(Event(
            type="rejected", time=self._clock(), client_address=self.client_ip, helo=self.helo,
            sender=sender, recipients=recipients, size=size, listener=self.role, reply=str(refusal),
            tenant=self.tenant.name if self.tenant is not None else "",
        ))


def sender_text(mail: MailRequest | None) -> str:
    """The envelope sender as recorded: "" for <> (and when unknown)."""
    if mail is None or mail.sender is None:
        return ""
    return str(mail.sender)


def parsed_sender_guess(arg: str | None) -> MailRequest | None:
    """For a refused MAIL (SIZE too big): the sender, when it parses, for the rejected event."""
    parsed = policy.parse_mail(arg, esmtp=True, max_size=2**63)
    return parsed if isinstance(parsed, MailRequest) else None
