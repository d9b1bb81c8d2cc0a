"""deliver(): one attempt of one message to a batch of its recipients, with MX fall-through.

The attempt decides how, never when (DESIGN principle 4): it takes the next hops the router
found, a pooled connection or fresh ones, and returns one Outcome per recipient. It never
touches the spool.

Order of servers: a pooled connection for the destination key first; then every address of
every hop, in the order given (MX preference, then address order). A connection-scope failure
(refused, timed out, a 4xx/5xx greeting, TLS required and absent, 421 or a lost connection in
the middle of a transaction) leaves the recipients it concerned for the next address, as
Postfix's smtp(8) does; the first server that takes a transaction gives the outcomes of its
recipients. A pooled connection that turns out dead costs nothing: its recipients go on to a
fresh connection. A 4xx or 5xx at MAIL, RCPT, DATA or the final dot is the server's word
about this message or recipient and is final for the attempt: unlike Postfix we do not try
the next MX on a 4xx there (a backup MX would take the mail only to queue it). Recipients no
server took get the last connection-scope outcome.

Like Postfix (smtp_mx_address_limit, smtp_mx_session_limit), an attempt tries at most
MAX_ADDRESSES addresses and talks to at most MAX_SESSIONS servers that greeted it.

A batch larger than ClientSettings.max_recipients goes in several transactions over the same
connection, and recipients refused with 452 (RFC 5321 4.5.3.1.10, too many recipients) while
others of the same transaction were accepted are sent again in the next transaction (each
round settles at least one recipient, so this ends).

RFCs: 5321 (5.1 MX fall-through, 4.5.3.1.10), 2920 via client.py.
"""

from __future__ import annotations

import msgspec

from mtad.deliver.client import ClientSettings, SessionFailed, SmtpConnection
from mtad.deliver.outcome import Outcome, local
from mtad.deliver.pool import Pool
from mtad.deliver.route import NextHop
from mtad.records import Envelope, Recipient

MAX_ADDRESSES = 10
"""Addresses tried (connected to or not) in one attempt."""
MAX_SESSIONS = 3
"""Fresh servers that greeted us in one attempt (a dead pooled connection does not count)."""


class AttemptResult(msgspec.Struct):
    outcomes: list[Outcome]
    """One per recipient given, same order."""
    relay: str
    """host[ip]:port of the server that gave the outcomes ("" if none)."""
    connected: bool
    """Some server greeted us (the destination is alive)."""
    dsn_relayed: bool = True
    """The server that took the recipients offers DSN, so NOTIFY went on with them (RFC 3461
    5.2.2); False: mtad owes senders who asked for NOTIFY=SUCCESS a "relayed" notice."""


NO_HOST = local("deferred", "4.4.4", "no next hop to try", scope="connection", reason="networkerror")


def settles(outcome: Outcome) -> bool:
    """The outcome is this server's word on the recipient: anything but a broken session."""
    return outcome.scope != "connection" or outcome.kind != "deferred"


def too_many(outcome: Outcome) -> bool:
    """A RCPT 452 (or the old 552, RFC 5321 4.5.3.1.10): the server takes fewer recipients per
    transaction; send them in the next one."""
    return outcome.phase == "rcpt" and outcome.reply.startswith(("452", "552"))


class _Attempt:
    """The recipients still waiting for a server, and what the servers said so far."""

    def __init__(self, key: str, envelope: Envelope, recipients: list[Recipient], body: bytes, pool: Pool,
                 settings: ClientSettings) -> None:
        self.key, self.envelope, self.recipients, self.body = key, envelope, recipients, body
        self.pool, self.settings = pool, settings
        self.results: list[Outcome | None] = [None] * len(recipients)
        self.pending = list(range(len(recipients)))
        self.last = NO_HOST
        self.relay = ""
        self.connected = False
        self.dsn_relayed = True

    async def run(self, hops: list[NextHop]) -> AttemptResult:
        conn = self.pool.take(self.key)
        if conn is not None:
            await self.use(conn)
        addresses = sessions = 0
        for hop in hops:
            for address in hop.addresses:
                if not self.pending or addresses >= MAX_ADDRESSES or sessions >= MAX_SESSIONS:
                    break
                addresses += 1
                shared = self.pool.take_server(self.key, address, hop.port)
                if shared is not None:  # another domain's idle connection to this very server
                    await self.use(shared)
                    if not self.pending:
                        break
                try:
                    conn = await SmtpConnection.open(hop.host, address, hop.port, self.settings)
                except SessionFailed as failed:
                    self.last = failed.outcome
                    # A reply (or a failure after the greeting) means a live server answered.
                    # A server that refuses at the greeting (421 storms) is as good as down, for
                    # the window and the dead-destination count (as Postfix counts it).
                    greeted = failed.outcome.phase not in ("connect", "greeting")
                    self.connected |= greeted
                    sessions += greeted
                    continue
                sessions += 1
                self.pool.opened(self.key)
                await self.use(conn)
        outcomes = [result if result is not None else self.last for result in self.results]
        return AttemptResult(outcomes=outcomes, relay=self.relay, connected=self.connected,
                             dsn_relayed=self.dsn_relayed)

    async def use(self, conn: SmtpConnection) -> None:
        """Transactions on one connection until the pending recipients are settled or it breaks."""
        try:
            while self.pending and conn.usable:
                batch = self.pending[:self.settings.max_recipients]
                rest = self.pending[len(batch):]
                outcomes = await conn.send(self.envelope, [self.recipients[i] for i in batch], self.body)
                self.connected = True
                # Someone got past RCPT: a 452 then was the server's per-transaction limit.
                progress = any(outcome.phase in ("data", "dot") for outcome in outcomes)
                again: list[int] = []
                for i, outcome in zip(batch, outcomes):
                    if not settles(outcome):  # the session broke: the next server may take it
                        self.last = outcome
                        again.append(i)
                        continue
                    self.results[i] = outcome
                    self.relay = conn.relay
                    self.dsn_relayed = "DSN" in conn.extensions
                    if progress and too_many(outcome):  # kept unless a later transaction does better
                        again.append(i)
                self.pending = rest + again
                if not all(settles(outcome) for outcome in outcomes):
                    break
        finally:
            self.pool.give(self.key, conn)


async def deliver(key: str, hops: list[NextHop], envelope: Envelope, recipients: list[Recipient],
                  body: bytes, pool: Pool, settings: ClientSettings) -> AttemptResult:
    """One attempt: one Outcome per recipient, in order (see the module docstring)."""
    if not recipients:
        return AttemptResult(outcomes=[], relay="", connected=False)
    return await _Attempt(key, envelope, recipients, body, pool, settings).run(hops)
