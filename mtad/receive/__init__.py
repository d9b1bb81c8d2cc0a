"""Receiving: the SMTP server side on aiosmtpd (listeners, sessions, dialog, relay policy, limits)."""
