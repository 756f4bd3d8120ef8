"""One contact's message on one channel, rendered exactly as every sender builds it.

The sending step and the test send (engine.services.test_send) both go through here, so
a test message is the real message, bar what the caller changes on purpose (its
idempotency key, its unsubscribe link)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.campaigns.rendering import CompiledChannel
from engine.channels import OutboundMessage


def contact_columns_read(compiled: CompiledChannel) -> frozenset[str]:
    """The contact columns build_message reads: the templates' (render), and a push's
    tokens, which it fans the message out to. A sender fetches only these."""
    if compiled.channel_type == "push":
        return compiled.contact_columns | {"push_tokens"}
    return compiled.contact_columns


def build_message(
    compiled: CompiledChannel,
    contact: Any,
    *,
    message_id: int,
    idempotency_key: str,
    address: str,
    unsubscribe_url: str,
    list_unsubscribe: bool = True,
    push_data: Mapping[str, str] | None = None,
) -> OutboundMessage:
    """The rendered message for `contact` (a Contact or a row with its columns).

    Raises TemplateRenderError naming the field when a template fails for this contact.
    `list_unsubscribe` adds the RFC 8058 headers to an email; a caller whose link does
    not unsubscribe anyone (a test send) leaves them out. `push_data` (the signed
    delivered-report token, engine.tracking.tokens.push_data) joins a push's FCM data;
    Herald's keys win over the template's."""
    content = compiled.render(contact, unsubscribe_url=unsubscribe_url)
    if compiled.tracking is not None:  # tracked links and the open pixel, this delivery's
        content = compiled.tracking.fill(content, message_id)
    push_tokens: tuple[str, ...] = ()
    if compiled.channel_type == "email" and list_unsubscribe:
        # RFC 8058 one-click unsubscribe: mailbox providers show an unsubscribe button.
        content["headers"] = {
            **(content.get("headers") or {}),
            "List-Unsubscribe": f"<{unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
    elif compiled.channel_type == "push":
        push_tokens = tuple(str(t) for t in (contact.push_tokens or ()))
        if push_data:
            content["data"] = {**(content.get("data") or {}), **push_data}
    return OutboundMessage(
        delivery_id=message_id,
        idempotency_key=idempotency_key,
        address=address,
        content=content,
        push_tokens=push_tokens,
    )
