"""Loopback servers that speak each provider's protocol, for tests and benchmarks.

Each one is a real server on 127.0.0.1 (SMTP through aiosmtpd, HTTP through the
standard library), records what it receives, checks the credentials the real provider
would check, and can be scripted to fail: 5xx, 429 with Retry-After, a stall longer than
the client's timeout, a permanent 4xx, for the next N requests or only for one address
or push token. An optional fixed latency per request makes benchmarks latency-bound.

They are plain classes (start/stop or `with`), so benchmarks can use them outside
pytest; tests/providers/fixtures.py wraps them in fixtures.
"""

from tests.providers.http_sinks import Fault, FcmSink, HttpSink, Recorded, TwilioSink, WhatsAppSink
from tests.providers.smtp_sink import ReceivedMail, SmtpServer, self_signed_tls

__all__ = [
    "Fault",
    "FcmSink",
    "HttpSink",
    "ReceivedMail",
    "Recorded",
    "SmtpServer",
    "TwilioSink",
    "WhatsAppSink",
    "self_signed_tls",
]
