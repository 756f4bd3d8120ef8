"""SMS through Twilio Programmable Messaging (the 2010-04-01 REST API).

Twilio answers 201 with the Message resource once it has *queued* the message; its
delivery is reported later to StatusCallback (handled by the webhooks).

The call is made in two halves (Channel.begin) on engine.channels.split_http: the
request is written, the dispatcher renders the next message while Twilio works, then
the answer is read. The request itself is built in prepare, i.e. while the previous
call is out, so a call is one write.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from engine.channels.base import Channel, OutboundMessage, SendResult, answered
from engine.channels.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    USER_AGENT,
    is_transient_status,
    json_or_empty,
    retry_after,
)
from engine.channels.split_http import Answer, SplitHttpClient, TransportError
from engine.settings import Settings

IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
STATUS_CALLBACK_PATH = "/webhooks/twilio/status"

# Twilio error codes that mean "not now" even though they come with a 4xx status.
_TRANSIENT_CODES = frozenset({20429, 14107, 30022})  # too many requests, rate limits


class TwilioChannel(Channel):
    name = "twilio"
    channel_type = "sms"

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        if not (settings.twilio_account_sid and settings.twilio_auth_token):
            raise ValueError("SMS_PROVIDER=twilio needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        sid = settings.twilio_account_sid
        self.url = f"{settings.twilio_api_base}/2010-04-01/Accounts/{sid}/Messages.json"
        parts = urlsplit(self.url)
        self._path = parts.path
        self.default_from = settings.twilio_from
        # A Messaging Service SID picks the sender from its pool instead of one number.
        self.messaging_service_sid = (
            settings.twilio_from if settings.twilio_from.startswith("MG") else ""
        )
        self.status_callback = f"{settings.public_base_url}{STATUS_CALLBACK_PATH}"
        credentials = base64.b64encode(f"{sid}:{settings.twilio_auth_token}".encode()).decode()
        self._client = SplitHttpClient(
            f"{parts.scheme}://{parts.netloc}",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            headers={
                "User-Agent": USER_AGENT,
                "Authorization": f"Basic {credentials}",
                "Accept": "application/json",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )

    def form_for(self, message: OutboundMessage) -> dict[str, str]:
        form = {
            "To": message.address,
            "Body": message.content.get("body", ""),
            "StatusCallback": self.status_callback,
        }
        sender = message.content.get("sender")
        if sender:
            form["From"] = sender  # with a Messaging Service it must be in its pool
        elif not self.messaging_service_sid:
            form["From"] = self.default_from
        if self.messaging_service_sid:
            form["MessagingServiceSid"] = self.messaging_service_sid
        return form

    def request_bytes(self, message: OutboundMessage) -> bytes:
        body = urlencode(self.form_for(message)).encode()
        return self._client.request_bytes(
            "POST", self._path, body, {IDEMPOTENCY_HEADER: message.idempotency_key}
        )

    def prepare(self, message: OutboundMessage) -> OutboundMessage:
        try:
            return dataclasses.replace(message, wire=self.request_bytes(message))
        except (ValueError, UnicodeEncodeError):
            return message  # begin() builds it again and says why it cannot

    def send(self, message: OutboundMessage) -> SendResult:
        return self.begin(message)()

    def begin(
        self, message: OutboundMessage, cleared: Callable[[], None] = lambda: None
    ) -> Callable[[], SendResult]:
        delivery_id = message.delivery_id
        request = message.wire
        if request is None:
            try:
                request = self.request_bytes(message)
            except (ValueError, UnicodeEncodeError) as exc:
                return answered(
                    SendResult.permanent(delivery_id, f"could not build the request: {exc}")
                )
        cleared()  # nothing of ours to overlap it with: the request is the hand-over
        try:
            read = self._client.start(request)
        except TransportError as exc:
            return answered(_transport_failure(delivery_id, exc))

        def answer() -> SendResult:
            try:
                response = read()
            except TransportError as exc:
                return _transport_failure(delivery_id, exc)
            return self._classify(delivery_id, response)

        return answer

    def _classify(self, delivery_id: int, response: Answer) -> SendResult:
        body = json_or_empty(response)
        if response.is_success and body.get("sid"):
            return SendResult.sent(delivery_id, str(body["sid"]))
        if response.is_success:
            return SendResult.transient(delivery_id, "twilio answered without a message sid")
        return self._failure(delivery_id, response, body)

    def _failure(self, delivery_id: int, response: Answer, body: dict) -> SendResult:
        status = response.status_code
        code = body.get("code")
        error = f"twilio {status}" + (f" {code}" if code else "")
        if body.get("message"):
            error += f": {body['message']}"
        if status in (401, 403):
            return SendResult.permanent(delivery_id, f"twilio credentials rejected ({error})")
        if is_transient_status(status) or code in _TRANSIENT_CODES:
            return SendResult.transient(delivery_id, error, retry_after(response))
        # 21211 invalid To, 21610 unsubscribed (STOP), 21614 not a mobile number, ...
        return SendResult.permanent(delivery_id, error, provider_code=str(code) if code else None)

    def close(self) -> None:
        self._client.close()


def _transport_failure(delivery_id: int, exc: TransportError) -> SendResult:
    """No usable answer: Twilio may or may not have the message, so it is transient and
    the retry carries the same idempotency token."""
    return SendResult.transient(delivery_id, f"twilio {exc}")
