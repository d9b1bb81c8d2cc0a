"""Delivery: the scheduler, router, connection pool and DSN sender wired together.

The daemon creates one Delivery after the spool and ingest exist, starts it once the
listeners are open, tells it about new mail through the event bus (a hint: the spool's due
index is the truth), and stops it after the listeners have drained: the scheduler starts no
new attempt, running attempts get the grace period, idle connections are closed.

One attempt, as the scheduler asks for it: read the body (the message may have been deleted
meanwhile), check the hop count (a mail loop), route the recipient domain (static route, MX,
implicit MX, or a local outcome such as null MX), and hand over to attempt.deliver(), which
talks SMTP and returns one Outcome per recipient. DSNs are built off the loop and re-enter
through ingest from the null sender (DESIGN principle 3).
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
import structlog

from mtad.config.schema import Config
from mtad.deliver import outcome as outcomes
from mtad.deliver.attempt import AttemptResult
from mtad.deliver.bounce import Failure, build_dsn, submission_flags, wants_dsn
from mtad.deliver.client import ClientSettings
from mtad.deliver.control import Control
from mtad.deliver.destq import Job, Windows
from mtad.deliver.outcome import Outcome
from mtad.deliver.pool import Pool
from mtad.deliver.route import Router
from mtad.deliver.scheduler import Scheduler
from mtad.deliver.tlspolicy import OutboundTls
from mtad.deliver.transitions import DsnAction, Policy
from mtad.dns import Resolver
from mtad.events import Event, EventBus
from mtad.ingest import Ingest, IngestError, Submission, header_section_end
from mtad.platform.verp import verp_from_config
from mtad.records import Envelope, Recipient
from mtad.retry import expires_at
from mtad.spool import Spool

log = structlog.get_logger("mtad.deliver")

_RECEIVED = re.compile(rb"(?:^|\n)received[ \t]*:", re.IGNORECASE)


class Delivery:
    def __init__(self, cfg: Config, spool: Spool, bus: EventBus, ingest: Ingest) -> None:
        delivery = cfg.delivery
        self.cfg = cfg
        self.spool = spool
        self.ingest = ingest
        self.resolver = Resolver(cfg.dns.nameservers, float(cfg.dns.timeout))
        self.router = Router(cfg.route, self.resolver,
                             own_names={cfg.server.hostname, delivery.helo_name or cfg.server.hostname},
                             own_addresses=set(), mx_port=delivery.mx_port)
        self.settings = ClientSettings.from_config(delivery, hostname=cfg.server.hostname)
        self.outbound_tls = OutboundTls(cfg, self.resolver)  # [[tls_policy]] and MTA-STS, per attempt
        self.pool = Pool(self.settings, idle_timeout=float(delivery.connection_idle_timeout),
                         max_messages=delivery.max_messages_per_connection,
                         max_idle_per_server=delivery.destination_concurrency)
        self.policy = Policy(min_backoff=float(delivery.min_backoff), max_backoff=float(delivery.max_backoff),
                             lifetime=float(delivery.max_queue_lifetime),
                             delay_warning=float(delivery.delay_warning))
        self.scheduler = Scheduler(
            spool, key_of=self.router.destination_key, attempt=self._attempt, publish=bus.publish,
            send_dsn=self._send_dsn, policy=self.policy,
            windows=Windows(initial=delivery.initial_concurrency, limit=delivery.destination_concurrency,
                            suspend_after=delivery.suspend_after, suspend_time=float(delivery.suspend_time)),
            max_connections=delivery.max_connections, active_limit=delivery.active_limit,
            max_recipients=delivery.max_recipients_per_transaction,
        )
        self.scheduler.paused = delivery.paused
        self.control = Control(self.scheduler)
        self.verp = verp_from_config(cfg)  # VERP return paths ([bounces] domain), or None
        self._task: asyncio.Task[None] | None = None
        bus.subscribe(self._on_event)

    def start(self, own_addresses: set[str]) -> None:
        """Start delivering; `own_addresses`: the listeners' bound "ip:port" (loop detection)."""
        self.router.set_own_addresses(own_addresses)
        self._task = asyncio.create_task(self.scheduler.run(), name="scheduler")

    async def stop(self, grace: float) -> None:
        await self.scheduler.stop(grace)
        if self._task is not None:
            await self._task
        await self.pool.close()
        await self.outbound_tls.close()
        self.resolver.close()

    def reload(self, cfg: Config) -> None:
        """SIGHUP: what can change in flight (delivery.paused; the rest needs a restart)."""
        if cfg.delivery.paused != self.scheduler.paused:
            log.info("deliver.paused" if cfg.delivery.paused else "deliver.resumed")
        self.scheduler.paused = cfg.delivery.paused
        self.scheduler.wake(rescan=True)

    def _on_event(self, event: Event) -> None:
        if event.type == "received" and not self.scheduler.paused:
            self.scheduler.wake()  # paused: reload() wakes it with a rescan

    # The admin API's queue hooks (held, released, deleted), beside the mail-log events.
    def held(self, queue_id: str) -> None:
        self.scheduler.forget(queue_id, deleted=False)

    def released(self, queue_id: str) -> None:
        self.scheduler.wake(rescan=True)

    def deleted(self, queue_id: str) -> None:
        self.scheduler.forget(queue_id, deleted=True)

    async def _attempt(self, job: Job, envelope: Envelope, recipients: list[Recipient]) -> AttemptResult:
        body = self.spool.read_body(envelope.id)
        if body is None:  # deleted meanwhile: the write-back finds no message and changes nothing
            gone = outcomes.local("deferred", "4.3.0", "message no longer queued", scope="message")
            return AttemptResult(outcomes=[gone] * len(recipients), relay="", connected=True)
        hops = len(_RECEIVED.findall(body, 0, header_section_end(body)))
        if hops > self.cfg.limits.max_received_headers:
            loop = outcomes.local("bounced", "5.4.6", f"mail loop: {hops} Received headers "
                                  f"(limit {self.cfg.limits.max_received_headers})", scope="message")
            return AttemptResult(outcomes=[loop] * len(recipients), relay="", connected=True)
        route = await self.router.resolve(job.domain)
        if isinstance(route, Outcome):
            # The destination answered (it does not exist, or takes no mail) unless DNS failed.
            return AttemptResult(outcomes=[route] * len(recipients), relay="", connected=route.kind != "deferred")
        key = job.key or self.router.destination_key(job.domain)
        if self.verp:
            envelope = msgspec.structs.replace(envelope, sender=self.verp.return_path(envelope))
        return await self.outbound_tls.deliver(key, route, envelope, recipients, body, self.pool, self.settings)

    async def _send_dsn(self, envelope: Envelope, items: list[tuple[Recipient, Outcome, str]],
                        action: DsnAction) -> None:
        if not action:
            return
        failures = [Failure(recipient=r, outcome=o, relay=relay) for r, o, relay in items
                    if wants_dsn(envelope.sender, r, action)]
        if not failures:
            return
        original = self.spool.read_body(envelope.id) or b""
        until = expires_at(envelope.arrival_time, self.policy.lifetime) if action == "delayed" else None
        dsn = await asyncio.to_thread(
            build_dsn, envelope=envelope, failures=failures, action=action,
            reporting_mta=self.cfg.server.hostname, original=original, now=time.time(), expires_at=until,
        )
        body_type, smtputf8 = submission_flags(envelope, failures, dsn)
        submission = Submission(
            sender="", recipients=[Recipient(address=envelope.sender)], body=dsn, listener="dsn",
            protocol="LOCAL", smtputf8=smtputf8, body_type=body_type,
        )
        try:
            queue_id = await self.ingest.accept(submission)
        except IngestError as exc:
            log.error("deliver.dsn_not_queued", queue_id=envelope.id, reply=str(exc.reply))
            raise
        log.info("deliver.dsn_queued", queue_id=envelope.id, dsn_queue_id=queue_id, action=action,
                 recipients=[f.recipient.address for f in failures])
