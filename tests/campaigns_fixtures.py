"""Helpers shared by the campaign, transition and template tests.

Rows the campaign API does not own (conversations, audiences, contacts) are written
straight through a session: their APIs are separate resources.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update

from engine.models import Audience, Campaign, CampaignChannel, Contact, Conversation

API = "/api/v1/campaigns"

EMAIL_CONFIG = {
    "subject": "Hello {{ contact.first_name }}",
    "html": "<p>Hi {{ contact.first_name }}, tier {{ contact.attributes.tier }}</p>",
    "text": "Hi {{ contact.first_name }}",
    "from_email": "news@example.com",
    "from_name": "Example News",
    "reply_to": "help@example.com",
}
SMS_CONFIG = {"body": "Hi {{ contact.first_name }}, {{ campaign.name }}", "sender": "Herald"}
PUSH_CONFIG = {
    "title": "Hi {{ contact.first_name }}",
    "body": "New for {{ contact.attributes.tier }}",
    "data": {"screen": "offers"},
    "image_url": "https://cdn.example.com/a.png",
    "url": "https://example.com/offers",
}
WHATSAPP_TEMPLATE_CONFIG = {
    "template": {
        "name": "spring_offer",
        "language": "en_US",
        "parameters": ["{{ contact.first_name }}", "{{ campaign.name }}"],
    }
}
VALID_CONFIGS = {
    "email": EMAIL_CONFIG,
    "sms": SMS_CONFIG,
    "push": PUSH_CONFIG,
    "whatsapp": WHATSAPP_TEMPLATE_CONFIG,
}


def create_campaign(client, account: dict, **body: Any) -> dict:
    body.setdefault("name", "Spring sale")
    response = client.post(API, json=body, headers=account["headers"])
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def add_channel(client, account: dict, campaign_id: str, channel_type: str = "email", **config):
    body = {"channel_type": channel_type, "config": config or VALID_CONFIGS[channel_type]}
    response = client.post(f"{API}/{campaign_id}/channels", json=body, headers=account["headers"])
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def insert_campaign(
    db_session,
    user_id: uuid.UUID,
    *,
    status: str = "draft",
    channels: tuple[str, ...] = ("email",),
    audiences: int = 1,
    name: str = "Direct",
) -> Campaign:
    """A campaign written straight to the database in any status, ready to send."""
    campaign = Campaign(user_id=user_id, name=name, status=status, config={"max_attempts": 3})
    db_session.add(campaign)
    db_session.flush()
    for channel_type in channels:
        db_session.add(
            CampaignChannel(
                campaign_id=campaign.id,
                channel_type=channel_type,
                config=VALID_CONFIGS[channel_type],
            )
        )
    for index in range(audiences):
        db_session.add(
            Audience(campaign_id=campaign.id, name=f"audience {index}", definition={"all": []})
        )
    db_session.commit()
    return campaign


def set_status(db_session, campaign_id, status: str) -> None:
    db_session.execute(
        update(Campaign).where(Campaign.id == uuid.UUID(str(campaign_id))).values(status=status)
    )
    db_session.commit()


def insert_audience(db_session, campaign_id, name: str = "Gold", definition=None) -> Audience:
    audience = Audience(
        campaign_id=uuid.UUID(str(campaign_id)),
        name=name,
        definition=definition
        or {"all": [{"field": "attributes.tier", "op": "eq", "value": "gold"}]},
    )
    db_session.add(audience)
    db_session.commit()
    return audience


def insert_conversation(db_session, user_id: uuid.UUID) -> Conversation:
    conversation = Conversation(user_id=user_id, title="Planning")
    db_session.add(conversation)
    db_session.commit()
    return conversation


def insert_contact(db_session, user_id: uuid.UUID, **fields: Any) -> Contact:
    contact = Contact(user_id=user_id, **fields)
    db_session.add(contact)
    db_session.commit()
    return contact
