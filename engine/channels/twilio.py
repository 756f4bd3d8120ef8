"""SMS through Twilio Programmable Messaging (the 2010-04-01 REST API).

Twilio answers 201 with the Message resource once it has *queued* the message; its
delivery is reported later to StatusCallback (handled by the webhooks).
"""

from __future__ import annotations

import httpx

from engine.channels.base import Channel, OutboundMessage, SendResult
from engine.channels.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    is_transient_status,
    json_or_empty,
    make_client,
    retry_after,
    transport_failure,
)
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
        self.default_from = settings.twilio_from
        # A Messaging Service SID picks the sender from its pool instead of one number.
        self.messaging_service_sid = (
            settings.twilio_from if settings.twilio_from.startswith("MG") else ""
        )
        self.status_callback = f"{settings.public_base_url}{STATUS_CALLBACK_PATH}"
        self._client = make_client(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            auth=(sid, settings.twilio_auth_token),
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

    def send(self, message: OutboundMessage) -> SendResult:
        delivery_id = message.delivery_id
        try:
            response = self._client.post(
                self.url,
                data=self.form_for(message),
                headers={IDEMPOTENCY_HEADER: message.idempotency_key},
            )
        except httpx.HTTPError as exc:
            return transport_failure(delivery_id, "twilio", exc)
        body = json_or_empty(response)
        if response.is_success and body.get("sid"):
            return SendResult.sent(delivery_id, str(body["sid"]))
        if response.is_success:
            return SendResult.transient(delivery_id, "twilio answered without a message sid")
        return self._failure(delivery_id, response, body)

    def _failure(self, delivery_id: int, response: httpx.Response, body: dict) -> SendResult:
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
