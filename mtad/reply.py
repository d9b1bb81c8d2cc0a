"""SMTP replies as values: a code, an enhanced status (RFC 3463) and bland text.

Pure. Every reply mtad sends is one of these; exception text never reaches a peer.
RFCs: 5321 section 4.2 (reply codes), 2034 and 3463 (enhanced status codes).
"""

from __future__ import annotations

import msgspec


class Reply(msgspec.Struct, frozen=True):
    code: int
    status: str
    """Enhanced status code ("2.0.0"), or "" for replies that carry none (220, 354)."""
    text: str

    def __str__(self) -> str:
        if self.status:
            return f"{self.code} {self.status} {self.text}"
        return f"{self.code} {self.text}"

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address")
SERVER_BUSY = Reply(421, "4.3.2", "Too many connections, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")
SPOOL_FAILED = Reply(451, "4.3.0", "Local error in processing")
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
MAIL_LOOP = Reply(554, "5.4.6", "Too many hops, mail loop detected")
BARE_NEWLINE = Reply(550, "5.6.0", "Bare <CR> or <LF> in message data is not allowed")
EIGHT_BIT_HEADERS = Reply(550, "5.6.7", "8-bit header data requires SMTPUTF8")

# Added for the SMTP receiver (mtad/receive/).
GOODBYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
COMMAND_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
PARAM_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameter not recognized")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "Mail transaction in progress")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
DATA_TOO_SLOW = Reply(421, "4.4.2", "Message data took too long, closing connection")


def queued(queue_id: str) -> Reply:
    """The reply to an accepted message: `250 2.0.0 Ok: queued as <id>`."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
