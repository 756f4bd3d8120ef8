"""WhatsApp through Meta's Cloud API (graph.facebook.com/{version}/{phone_number_id}).

Marketing messages must be approved templates; a free-form text body only reaches a
contact inside the 24-hour window after they last wrote to us (error 131047 otherwise).
The Cloud API has no idempotency key; `biz_opaque_callback_data` carries ours so the
status webhooks can name the delivery they are about.
"""

from __future__ import annotations

from typing import Any

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

# Graph error codes that mean "not now" although they may come with a 400.
_TRANSIENT_CODES = frozenset(
    {
        1,  # unknown API error
        2,  # service temporarily unavailable
        4,  # application request limit
        80007,  # WABA rate limit
        130429,  # Cloud API throughput reached
        131000,  # something went wrong
        131016,  # service unavailable
        131048,  # spam rate limit
        131056,  # pair (business, consumer) rate limit
        133004,  # server temporarily unavailable
    }
)
_CREDENTIAL_CODES = frozenset({190, 10, 200})  # token expired/invalid, missing permission


class WhatsAppCloudChannel(Channel):
    name = "cloud"
    channel_type = "whatsapp"

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        if not (settings.whatsapp_phone_number_id and settings.whatsapp_access_token):
            raise ValueError(
                "WHATSAPP_PROVIDER=cloud needs WHATSAPP_PHONE_NUMBER_ID and WHATSAPP_ACCESS_TOKEN"
            )
        self.url = f"{settings.whatsapp_api_base}/{settings.whatsapp_phone_number_id}/messages"
        self._client = make_client(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            headers={"Authorization": f"Bearer {settings.whatsapp_access_token}"},
        )

    def payload_for(self, message: OutboundMessage) -> dict[str, Any]:
        content = message.content
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.address,
            "biz_opaque_callback_data": message.idempotency_key,
        }
        template = content.get("template")
        if template:
            body: dict[str, Any] = {
                "name": template["name"],
                "language": {"code": template["language"]},
            }
            parameters = template.get("parameters") or []
            if parameters:
                body["components"] = [
                    {
                        "type": "body",
                        "parameters": [{"type": "text", "text": str(p)} for p in parameters],
                    }
                ]
            payload.update(type="template", template=body)
        else:
            payload.update(type="text", text={"body": content.get("body", "")})
        return payload

    def send(self, message: OutboundMessage) -> SendResult:
        delivery_id = message.delivery_id
        try:
            payload = self.payload_for(message)
        except (KeyError, TypeError) as exc:
            return SendResult.permanent(delivery_id, f"invalid whatsapp content: missing {exc}")
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            return transport_failure(delivery_id, "whatsapp", exc)
        body = json_or_empty(response)
        if response.is_success:
            messages = body.get("messages") or [{}]
            message_id = messages[0].get("id") if isinstance(messages[0], dict) else None
            if message_id:
                return SendResult.sent(delivery_id, str(message_id))
            return SendResult.transient(delivery_id, "whatsapp answered without a message id")
        return _failure(delivery_id, response, body)

    def close(self) -> None:
        self._client.close()


def _failure(delivery_id: int, response: httpx.Response, body: dict) -> SendResult:
    status = response.status_code
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    code = error.get("code")
    text = f"whatsapp {status}" + (f" {code}" if code else "")
    error_data = error.get("error_data")
    detail = (isinstance(error_data, dict) and error_data.get("details")) or error.get("message")
    if detail:
        text += f": {detail}"
    if status == 401 or code in _CREDENTIAL_CODES:
        return SendResult.permanent(delivery_id, f"whatsapp credentials rejected ({text})")
    if is_transient_status(status) or code in _TRANSIENT_CODES:
        return SendResult.transient(delivery_id, text, retry_after(response))
    # 131026 undeliverable, 131047 outside the 24 h window, 132001 template missing, ...
    return SendResult.permanent(delivery_id, text, provider_code=str(code) if code else None)
