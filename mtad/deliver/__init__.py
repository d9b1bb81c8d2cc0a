"""The delivery side: from the spool's due index to other servers, and back to the spool.

DESIGN principle 4: the queue decides when, the attempt decides how.

    scheduler.py  Scheduler: pulls due messages from the spool (ids and recipient state, never
                  bodies), groups recipients by destination, runs destination queues round-robin
                  within their windows, applies outcomes back to the spool. No socket code.
    destq.py      DestinationQueue: one destination's ready work, concurrency window,
                  suspension (dead destination), counters for `queue summary`. Pure.
    route.py      Router: destination key of a domain (static [[route]] or the domain), and
                  resolve(domain) -> next hops (MX in order, implicit MX) or a local Outcome
                  (null MX, NXDOMAIN, DNS failure, loop).
    client.py     SmtpConnection: one outbound SMTP session on asyncio streams (EHLO, STARTTLS,
                  PIPELINING, per-phase timeouts, dot-stuffing, per-recipient replies).
    pool.py       Pool: idle connections per destination for reuse.
    attempt.py    deliver(): one message, a batch of its recipients, the next hops -> one
                  Outcome per recipient (fall-through to the next MX on connection failures).
                  Never touches the spool.
    tlspolicy.py  OutboundTls: the TLS mode of each attempt ([[tls_policy]], MTA-STS enforce
                  and testing) in front of attempt.deliver().
    mtasts.py     MtaSts: RFC 8461 TXT discovery, HTTPS policy fetch, grammar, cache.
    outcome.py    Outcome: every reply or network error classified once (pure).
    bounce.py     RFC 3464 DSN builder (pure); DSNs re-enter through ingest.
    service.py    Delivery: the scheduler, router, pool and DSN sender wired together.

Imports: deliver never imports receive; it meets the receiving side in the spool and ingest.
"""
