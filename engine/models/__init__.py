"""All tables, importable from one place (Alembic's autogenerate reads Base.metadata)."""

from engine.models.base import Base
from engine.models.campaigns import Audience, Campaign, CampaignChannel
from engine.models.contacts import Contact, Suppression
from engine.models.conversations import Conversation, Message
from engine.models.deliveries import Delivery
from engine.models.events import DeliveryEvent, SoftBounce
from engine.models.imports import ContactImport, ContactImportRow
from engine.models.links import CampaignLink
from engine.models.sources import ContactSource, DataEvent, DataSource
from engine.models.users import TokenBlacklist, User, UserSession

__all__ = [
    "Audience",
    "Base",
    "Campaign",
    "CampaignChannel",
    "CampaignLink",
    "Contact",
    "ContactImport",
    "ContactImportRow",
    "ContactSource",
    "Conversation",
    "DataEvent",
    "DataSource",
    "Delivery",
    "DeliveryEvent",
    "Message",
    "SoftBounce",
    "Suppression",
    "TokenBlacklist",
    "User",
    "UserSession",
]
