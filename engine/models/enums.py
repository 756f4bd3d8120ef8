"""Every enumeration stored in the database; CHECK constraints are built from these."""

CAMPAIGN_STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
CHANNEL_TYPES = ("email", "sms", "push", "whatsapp")
CHANNEL_STATUSES = ("pending", "planning", "planned", "done")
CONVERSATION_STATUSES = ("active", "archived")
MESSAGE_ROLES = ("user", "assistant")
SOURCE_TYPES = ("gtm", "facebook_pixel", "shopify")
SOURCE_STATUSES = ("active", "paused", "error")
DELIVERY_STATUSES = ("queued", "sending", "sent", "failed", "cancelled", "suppressed")
SUPPRESSION_REASONS = ("unsubscribe", "bounce", "complaint", "manual")
IMPORT_STATUSES = ("receiving", "queued", "running", "completed", "failed")
