"""Shared by the webhook and tracking tests: an app whose providers have webhook secrets,
deliveries already sent, and requests signed exactly as each provider signs them.

Import the fixtures a module uses by their function names (`hook_app_fixture`,
`hooks_fixture`) and ask for them as `hook_app` and `hooks`, as tests/providers does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from engine.models import CampaignChannel, Contact, Delivery, DeliveryEvent, Suppression
from engine.settings import Settings
from tests.campaigns_fixtures import insert_campaign, insert_contact
from tests.dispatch_helpers import record_sent

TWILIO_TOKEN = "twilio-webhook-auth-token"
WHATSAPP_SECRET = "whatsapp-app-secret"
WHATSAPP_VERIFY = "verify-me-please"
EMAIL_SECRET = "email-webhook-secret"
PUBLIC = "http://herald.test"

ADDRESSES = {
    "email": "Ann@Example.com",
    "sms": "+14155550101",
    "whatsapp": "+14155550102",
    "push": None,  # the contact id
}


def webhook_settings(settings: Settings, **overrides) -> Settings:
    return replace(
        settings,
        public_base_url=PUBLIC,
        twilio_auth_token=TWILIO_TOKEN,
        whatsapp_app_secret=WHATSAPP_SECRET,
        whatsapp_verify_token=WHATSAPP_VERIFY,
        email_webhook_secret=EMAIL_SECRET,
        **overrides,
    )


@pytest.fixture(name="hook_app")
def hook_app_fixture(settings):
    from api import create_app
    from api.extensions import db

    app = create_app(webhook_settings(settings))
    yield app
    db.dispose(app)
    app.extensions["herald"].celery.close()


@pytest.fixture(name="hooks")
def hooks_fixture(hook_app):
    """A test client of the app with webhook secrets configured."""
    return hook_app.test_client()


@dataclass(frozen=True)
class Sent:
    delivery_id: int
    channel_id: uuid.UUID
    campaign_id: uuid.UUID
    contact_id: uuid.UUID
    user_id: uuid.UUID
    address: str


def sent_delivery(
    db_session,
    user_id: uuid.UUID,
    channel: str = "email",
    *,
    address: str | None = None,
    provider_message_id: str | None = None,
    status: str = "sent",
) -> Sent:
    """A running campaign with one channel and one delivery to a new contact, recorded
    as the sender records it (status sent, sent_at, sent_count + 1) unless `status`
    says otherwise (e.g. sending: the provider accepted it, the checkpoint is pending)."""
    campaign = insert_campaign(db_session, user_id, status="running", channels=(channel,))
    channel_row = db_session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
    ).one()
    if address is None:
        address = ADDRESSES[channel]
    fields: dict = {}
    if channel == "email":
        fields["email"] = address.lower()
    elif channel == "sms":
        fields["phone"] = address
    elif channel == "whatsapp":
        fields["whatsapp"] = address
    elif channel == "push":
        fields["push_tokens"] = ["device-1"]
    # Several campaigns to one address go to one contact (emails are unique per user).
    contact = None
    if channel != "push":
        column, value = next(iter(fields.items()))
        contact = db_session.scalars(
            select(Contact).where(Contact.user_id == user_id, getattr(Contact, column) == value)
        ).first()
    contact = contact or insert_contact(db_session, user_id, **fields)
    if channel == "push":
        address = str(contact.id)
    delivery = Delivery(
        campaign_channel_id=channel_row.id,
        contact_id=contact.id,
        address=address,
        status="sending" if status == "sent" else status,
        attempts=1,
        provider_message_id=provider_message_id,
    )
    db_session.add(delivery)
    db_session.commit()
    if status == "sent":
        assert record_sent(db_session, [delivery.id], datetime.now(UTC)) == 1
    return Sent(delivery.id, channel_row.id, campaign.id, contact.id, user_id, address)


# -- signing as the providers do ----------------------------------------------------------


def twilio_signature(url: str, form: dict[str, str], token: str = TWILIO_TOKEN) -> str:
    """Written out from Twilio's documentation, independently of engine.tracking."""
    data = url + "".join(f"{key}{form[key]}" for key in sorted(form))
    digest = hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def post_twilio(client, path: str, form: dict[str, str], *, signature: str | None = "sign"):
    headers = {}
    if signature == "sign":
        headers["X-Twilio-Signature"] = twilio_signature(PUBLIC + path, form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    return client.post(
        path,
        data=urlencode(form),
        content_type="application/x-www-form-urlencoded",
        headers=headers,
    )


def hub_signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_whatsapp(client, payload, *, signature: str | None = "sign"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {}
    if signature == "sign":
        headers["X-Hub-Signature-256"] = hub_signature(body, WHATSAPP_SECRET)
    elif signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return client.post(
        "/webhooks/whatsapp", data=body, content_type="application/json", headers=headers
    )


def post_email(
    client, body, *, content_type: str = "application/json", signature: str | None = "sign"
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {}
    if signature == "sign":
        headers["X-Herald-Signature"] = hub_signature(raw, EMAIL_SECRET)
    elif signature is not None:
        headers["X-Herald-Signature"] = signature
    return client.post("/webhooks/email", data=raw, content_type=content_type, headers=headers)


def whatsapp_status(
    wamid: str,
    status: str,
    *,
    delivery_id: int | None = None,
    timestamp: int | None = None,
    errors: list | None = None,
) -> dict:
    item: dict = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp or int(datetime.now(UTC).timestamp())),
        "recipient_id": "14155550102",
    }
    if delivery_id is not None:
        item["biz_opaque_callback_data"] = f"d{delivery_id}"
    if errors:
        item["errors"] = errors
    return item


def whatsapp_payload(statuses=(), messages=()) -> dict:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            **({"statuses": list(statuses)} if statuses else {}),
                            **({"messages": list(messages)} if messages else {}),
                        },
                    }
                ],
            }
        ],
    }


# -- reading back -------------------------------------------------------------------------


def delivery(db_session, delivery_id: int) -> Delivery:
    db_session.expire_all()
    return db_session.get(Delivery, delivery_id)


def channel_counts(db_session, channel_id) -> dict[str, int]:
    db_session.expire_all()
    row = db_session.get(CampaignChannel, channel_id)
    return {
        "sent": row.sent_count,
        "delivered": row.delivered_count,
        "opened": row.opened_count,
        "clicked": row.clicked_count,
    }


def events_of(db_session, delivery_id: int | None = None) -> list[DeliveryEvent]:
    db_session.expire_all()
    stmt = select(DeliveryEvent).order_by(DeliveryEvent.id)
    if delivery_id is not None:
        stmt = stmt.where(DeliveryEvent.delivery_id == delivery_id)
    return list(db_session.scalars(stmt))


def suppressions_of(db_session) -> list[tuple]:
    db_session.expire_all()
    return [
        (row.user_id, row.channel, row.address, row.reason)
        for row in db_session.scalars(
            select(Suppression).order_by(Suppression.channel, Suppression.address)
        )
    ]
