"""The provider interface: one rendered message in, one classified outcome out.

The dispatcher calls a channel once per message (or once per batch for a provider that
accepts batches) so it can record each acceptance durably before the next call; that
is what bounds the resends after a crash to the calls in flight. Providers therefore
never raise for a message that failed: they classify it as transient (try again later)
or permanent (it will never work), and the dispatcher decides what to do. Only a
programming or configuration error raises.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

Outcome = Literal["sent", "transient", "permanent"]

# Long enough to diagnose, short enough to keep in deliveries.last_error for every row.
ERROR_MAX = 500

# The key travels inside a Message-ID left part and HTTP headers, so it stays within
# RFC 5322 dot-atom characters; the dispatcher derives it from the delivery id anyway.
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class OutboundMessage:
    """One message for one contact, already rendered.

    `content` holds the channel's rendered fields:
    - email: subject, html and/or text, from_email, from_name, reply_to, headers
      (e.g. List-Unsubscribe and List-Unsubscribe-Post);
    - sms: body, sender;
    - push: title, body, data (strings), image_url, url;
    - whatsapp: template {name, language, parameters} or body.
    """

    delivery_id: int
    idempotency_key: str
    address: str = ""
    content: Mapping[str, Any] = field(default_factory=dict)
    push_tokens: Sequence[str] = ()
    # The message as the provider will receive it, when Channel.prepare built it ahead
    # of the call; None means send() builds it.
    wire: bytes | None = None

    def __post_init__(self) -> None:
        if not _IDEMPOTENCY_KEY.match(self.idempotency_key):
            raise ValueError(
                "idempotency_key must be 1-128 characters of letters, digits, '.', '_' "
                f"or '-' starting with a letter or digit, got {self.idempotency_key!r}"
            )


@dataclass(frozen=True)
class SendResult:
    delivery_id: int
    outcome: Outcome
    provider_message_id: str | None = None
    error: str | None = None
    # Seconds the provider asked us to wait (Retry-After), for transient outcomes.
    retry_after: float | None = None
    # Push tokens the provider says will never work again; the caller removes them.
    invalid_push_tokens: tuple[str, ...] = ()
    # The provider's own code for a refusal (Twilio "21211", WhatsApp "131026", an SMTP
    # RCPT's enhanced status "5.1.1"): what says the address itself is bad.
    provider_code: str | None = None

    @classmethod
    def sent(
        cls, delivery_id: int, provider_message_id: str, invalid_push_tokens: Sequence[str] = ()
    ) -> Self:
        return cls(
            delivery_id,
            "sent",
            provider_message_id=provider_message_id,
            invalid_push_tokens=tuple(invalid_push_tokens),
        )

    @classmethod
    def transient(
        cls,
        delivery_id: int,
        error: str,
        retry_after: float | None = None,
        invalid_push_tokens: Sequence[str] = (),
    ) -> Self:
        return cls(
            delivery_id,
            "transient",
            error=_short(error),
            retry_after=retry_after,
            invalid_push_tokens=tuple(invalid_push_tokens),
        )

    @classmethod
    def permanent(
        cls,
        delivery_id: int,
        error: str,
        invalid_push_tokens: Sequence[str] = (),
        provider_code: str | None = None,
    ) -> Self:
        return cls(
            delivery_id,
            "permanent",
            error=_short(error),
            invalid_push_tokens=tuple(invalid_push_tokens),
            provider_code=provider_code,
        )

    @property
    def is_sent(self) -> bool:
        return self.outcome == "sent"


def answered(result: SendResult) -> Callable[[], SendResult]:
    """A call's answer that is already known (Channel.begin's return)."""
    return lambda: result


def _short(error: str) -> str:
    error = " ".join(error.split())  # provider errors can span lines; the log wants one
    return error if len(error) <= ERROR_MAX else error[: ERROR_MAX - 1] + "…"


class Channel(ABC):
    """A configured provider for one channel type. Not thread-safe: one per worker thread.

    A channel holds a connection (an SMTP session, an HTTP pool) across calls, so make
    one per worker process and close it on shutdown (it is also a context manager).
    """

    name: str  # the provider: "smtp", "twilio", "fcm", "cloud", "null"
    channel_type: str  # "email", "sms", "push" or "whatsapp"
    # True when send_many hands the whole batch to the provider in ONE call, so the
    # dispatcher should use it (the batch is then in flight as a whole); False means
    # the dispatcher should call send() per message and record each result in between.
    accepts_batch: ClassVar[bool] = False

    def prepare(self, message: OutboundMessage) -> OutboundMessage:
        """The message with whatever needs no connection already built (see `wire`).

        The dispatcher prepares the next message while the provider is still answering
        the current one (see begin), so work moved here leaves the time between two
        calls. A message that cannot be built is returned as it is:
        send() then classifies the failure."""
        return message

    @abstractmethod
    def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message to the provider; classify any per-message failure."""

    def begin(
        self, message: OutboundMessage, cleared: Callable[[], None] = lambda: None
    ) -> Callable[[], SendResult]:
        """Start the call and return what waits for its answer (call it exactly once,
        before the channel's next call).

        `cleared` must be called, once, before the message itself is handed over (the
        dispatcher's: write the previous acceptance to the Redis journal, whose reply
        it reads once begin has returned; it passes one only when no rate limit
        applies, so it never waits). A protocol with round trips of its own before the
        hand-over may call it while they are under way (SMTP: while the relay answers
        MAIL, RCPT and DATA). A call that fails before the hand-over need not call it.

        Between begin and the answer, the dispatcher prepares the next message, so a
        protocol that can write a request and read its answer later (SMTP: the relay's
        reply to the end of DATA) does that work while the provider works. By default
        the whole call happens here."""
        cleared()
        return answered(self.send(message))

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        return [self.send(message) for message in messages]

    def close(self) -> None:  # noqa: B027 - deliberately a no-op for stateless providers
        """Release connections; the channel may not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
