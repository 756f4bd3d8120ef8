"""Every enumeration stored in the database; CHECK constraints are built from these."""

CAMPAIGN_STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
CHANNEL_TYPES = ("email", "sms", "push", "whatsapp")
CHANNEL_STATUSES = ("pending", "planning", "planned", "done")
CONVERSATION_STATUSES = ("active", "archived")
MESSAGE_ROLES = ("user", "assistant")
SOURCE_TYPES = ("gtm", "facebook_pixel", "shopify")
SOURCE_STATUSES = ("active", "paused", "error")
DELIVERY_STATUSES = ("queued", "sending", "sent", "failed", "cancelled", "suppressed")
# soft_bounce: an address that bounced softly SOFT_BOUNCE_THRESHOLD times in a row.
SUPPRESSION_REASONS = ("unsubscribe", "bounce", "complaint", "manual", "soft_bounce")
# What a provider (or a recipient) reported about one delivery; engine/tracking records
# them. "sent" is the provider's own hand-off report and never moves anything.
DELIVERY_EVENT_KINDS = ("sent", "delivered", "opened", "clicked", "failed", "complained")
IMPORT_STATUSES = ("receiving", "queued", "running", "completed", "failed")
