"""The loopback providers of tests/providers, plus what the chaos tests need on top:
counting what was accepted per idempotency key, and failure bursts placed by request
number (the 200th to 229th request answers 429, say) rather than "the next N", so a
burst lands mid-campaign without the test having to race the workers to inject it.

A resend is a second accepted message with the same key: the engine derives the key
from the delivery id (`d<id>`) and sends it as the SMTP Message-ID
(`<herald.d<id>@domain>`) and as Twilio's I-Twilio-Idempotency-Token header.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass

from tests.providers.http_sinks import Recorded, TwilioSink
from tests.providers.smtp_sink import SmtpServer

MESSAGE_ID = re.compile(r"<herald\.(?P<key>[A-Za-z0-9._-]+)@")
TWILIO_KEY_HEADER = "I-Twilio-Idempotency-Token"


@dataclass(frozen=True)
class Burst:
    """Requests number start … start + length - 1 (1-based, counted by the sink) fail."""

    start: int
    length: int
    status: int | str  # an HTTP status, or an SMTP reply line for the SMTP sink
    retry_after: float | None = None


def smtp_key(mail) -> str:
    found = MESSAGE_ID.search(mail.message["Message-ID"] or "")
    assert found, f"a message without Herald's Message-ID: {mail.message['Message-ID']!r}"
    return found["key"]


class ChaosSmtpServer(SmtpServer):
    """The SMTP relay, counting every end-of-DATA and failing bursts of them."""

    def __init__(self, *, latency: float = 0.0) -> None:
        super().__init__(latency=latency)
        self.data_seen = 0
        self.refused = 0
        self._bursts: list[Burst] = []
        self._counter_lock = threading.Lock()

    def burst(self, start: int, length: int, reply: str = "451 4.3.0 Try again later") -> None:
        self._bursts.append(Burst(start, length, reply))

    def _take_data_fault(self):
        with self._counter_lock:
            self.data_seen += 1
            for burst in self._bursts:
                if burst.start == self.data_seen:
                    self.fail_next(burst.length, str(burst.status))
        fault = super()._take_data_fault()
        if fault is not None and fault.reply is not None:
            with self._counter_lock:
                self.refused += 1
        return fault

    def accepted_keys(self) -> Counter[str]:
        with self._lock:
            mails = list(self.messages)
        return Counter(smtp_key(mail) for mail in mails)

    def addresses_by_key(self) -> dict[str, set[str]]:
        with self._lock:
            mails = list(self.messages)
        found: dict[str, set[str]] = {}
        for mail in mails:
            found.setdefault(smtp_key(mail), set()).update(mail.rcpt_tos)
        return found


class ChaosTwilioSink(TwilioSink):
    """The Twilio API, failing bursts of requests by number."""

    def __init__(self, *, latency: float = 0.0) -> None:
        super().__init__(latency=latency)
        self.sends_seen = 0
        self._bursts: list[Burst] = []

    def burst(self, start: int, length: int, status: int, retry_after: float | None = None):
        self._bursts.append(Burst(start, length, status, retry_after))

    def _take_fault(self, request: Recorded):
        if request.kind == "send":
            with self._lock:  # a Condition over an RLock: fail() below may take it again
                self.sends_seen += 1
                for burst in self._bursts:
                    if burst.start == self.sends_seen:
                        self.fail(
                            int(burst.status), times=burst.length, retry_after=burst.retry_after
                        )
        return super()._take_fault(request)

    @staticmethod
    def key(request: Recorded) -> str:
        key = request.header(TWILIO_KEY_HEADER)
        assert key, f"an SMS without {TWILIO_KEY_HEADER}"
        return key

    def accepted_keys(self) -> Counter[str]:
        return Counter(self.key(request) for request in self.accepted())

    def addresses_by_key(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for request in self.accepted():
            found.setdefault(self.key(request), set()).add(request.form.get("To", ""))
        return found

    def answered(self, status: int) -> list[Recorded]:
        return [request for request in self.received() if request.status == status]
