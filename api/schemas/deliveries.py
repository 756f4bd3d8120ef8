"""Schemas of the per-message log, campaign stats, retry-failed and unsubscribe."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.models.enums import (
    CAMPAIGN_STATUSES,
    CHANNEL_STATUSES,
    CHANNEL_TYPES,
    DELIVERY_STATUSES,
)
from engine.services.deliveries import EVENTS
from engine.services.test_send import MAX_TEST_CONTACTS


class DeliveryListArgs(PageArgs):
    status = fields.String(load_default=None, validate=validate.OneOf(DELIVERY_STATUSES))
    channel = fields.String(load_default=None, validate=validate.OneOf(CHANNEL_TYPES))
    format = fields.String(
        load_default="json",
        validate=validate.OneOf(["json", "csv"]),
        metadata={
            "description": "csv: the whole filtered log, oldest first, streamed as text/csv"
            " (limit and cursor are ignored)"
        },
    )


class DeliveryOut(Schema):
    id = fields.Integer(required=True)
    channel = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    contact_id = fields.UUID(allow_none=True, metadata={"description": "null once erased"})
    address = fields.String(
        allow_none=True, metadata={"description": "the address used; null once erased"}
    )
    status = fields.String(required=True, metadata={"enum": list(DELIVERY_STATUSES)})
    attempts = fields.Integer(required=True)
    last_error = fields.String(allow_none=True)
    provider_message_id = fields.String(allow_none=True)
    next_attempt_at = fields.DateTime(
        allow_none=True, metadata={"description": "when a queued retry comes due"}
    )
    sent_at = fields.DateTime(allow_none=True)
    delivered_at = fields.DateTime(allow_none=True)
    opened_at = fields.DateTime(allow_none=True)
    clicked_at = fields.DateTime(allow_none=True)
    failed_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(required=True)


DeliveryPage = page_schema(DeliveryOut, "DeliveryPage")


def _event_counts(name: str) -> type[Schema]:
    return Schema.from_dict({event: fields.Integer(required=True) for event in EVENTS}, name=name)


_COUNTERS_DOC = "campaign_channels' counters, kept by the engine"
_COUNTED_DOC = (
    "the same events counted over the deliveries (rows whose <event>_at is set); "
    "equal to `counters` whenever nothing is being recorded"
)
_ByStatus = Schema.from_dict(
    {status: fields.Integer(required=True) for status in DELIVERY_STATUSES},
    name="DeliveriesByStatus",
)


class ChannelStatsOut(Schema):
    channel_id = fields.UUID(required=True)
    channel = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    status = fields.String(required=True, metadata={"enum": list(CHANNEL_STATUSES)})
    total = fields.Integer(required=True, metadata={"description": "deliveries planned"})
    by_status = fields.Nested(
        _ByStatus, required=True, metadata={"description": "deliveries per status, zeros too"}
    )
    counters = fields.Nested(
        _event_counts("ChannelCounters"), required=True, metadata={"description": _COUNTERS_DOC}
    )
    from_deliveries = fields.Nested(
        _event_counts("ChannelEventsCounted"), required=True, metadata={"description": _COUNTED_DOC}
    )


class LinkStatsOut(Schema):
    link_id = fields.Integer(required=True)
    url = fields.String(
        required=True,
        metadata={"description": "as written in the template; a dynamic link's template text"},
    )
    dynamic = fields.Boolean(
        required=True, metadata={"description": "built per contact ({{ … }} in the URL)"}
    )
    unique_clicks = fields.Integer(
        required=True, metadata={"description": "messages whose recipient clicked it"}
    )
    total_clicks = fields.Integer(required=True, metadata={"description": "people's clicks"})
    machine_clicks = fields.Integer(
        required=True, metadata={"description": "clicks by scanners, previews and bots"}
    )


class HourStatsOut(Schema):
    hour = fields.DateTime(required=True, metadata={"description": "the hour's start (UTC)"})
    sent = fields.Integer(required=True)
    delivered = fields.Integer(required=True)
    opened = fields.Integer(required=True, metadata={"description": "first human opens"})
    clicked = fields.Integer(required=True, metadata={"description": "first human clicks"})


_Rates = Schema.from_dict(
    {
        name: fields.Float(allow_none=True, required=True, metadata={"description": doc})
        for name, doc in (
            ("delivery", "delivered / sent"),
            ("open", "human opens / rate_base"),
            ("click", "human clicks (unique) / rate_base"),
        )
    },
    name="EngagementRates",
)
_Activity = Schema.from_dict(
    {
        "opened": fields.Integer(required=True, metadata={"description": "messages opened"}),
        "clicked": fields.Integer(required=True, metadata={"description": "messages clicked"}),
        "clicks": fields.Integer(required=True, metadata={"description": "clicks, repeats too"}),
    },
    name="EngagementActivity",
)
_Bounces = Schema.from_dict(
    {"hard": fields.Integer(required=True), "soft": fields.Integer(required=True)},
    name="EngagementBounces",
)


class ChannelEngagementOut(Schema):
    channel_id = fields.UUID(required=True)
    channel = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    rate_base = fields.String(
        required=True,
        metadata={
            "enum": ["delivered", "sent"],
            "description": "what open and click rates divide by: delivered for sms and "
            "whatsapp (always reported), sent for email and push",
        },
    )
    rates = fields.Nested(
        _Rates, required=True, metadata={"description": "null where the divisor is 0"}
    )
    humans = fields.Nested(_Activity, required=True)
    machines = fields.Nested(
        _Activity,
        required=True,
        metadata={"description": "privacy proxies, scanners, previews, bots: not counted"},
    )
    bounces = fields.Nested(_Bounces, required=True)
    complaints = fields.Integer(required=True)
    failed = fields.Integer(
        required=True, metadata={"description": "failed after the provider accepted them"}
    )
    unsubscribes = fields.Integer(
        required=True,
        metadata={"description": "recipients who unsubscribed the address after this message"},
    )
    links = fields.List(fields.Nested(LinkStatsOut), required=True)
    timeline = fields.List(fields.Nested(HourStatsOut), required=True)


class CampaignStatsOut(Schema):
    campaign_id = fields.UUID(required=True)
    status = fields.String(required=True, metadata={"enum": list(CAMPAIGN_STATUSES)})
    status_reason = fields.String(
        allow_none=True, metadata={"description": "why the engine changed the status itself"}
    )
    started_at = fields.DateTime(allow_none=True)
    ended_at = fields.DateTime(allow_none=True)
    channels = fields.List(fields.Nested(ChannelStatsOut), required=True)
    engagement = fields.List(
        fields.Nested(ChannelEngagementOut),
        required=True,
        metadata={"description": "per channel, in the order of `channels`"},
    )
    timeline = fields.List(
        fields.Nested(HourStatsOut),
        required=True,
        metadata={"description": "hourly, every channel together"},
    )


class RetryFailedOut(Schema):
    requeued = fields.Integer(required=True, metadata={"description": "failed rows re-queued"})
    status = fields.String(
        required=True,
        metadata={
            "enum": list(CAMPAIGN_STATUSES),
            "description": "running, or unchanged when nothing had failed",
        },
    )


class OneClickArgs(Schema):
    """RFC 8058's body (`List-Unsubscribe=One-Click`; an empty body is accepted too):
    this message's channel only. The page's own form sends `form=choices` and one
    `channels` field per ticked channel instead. Other form fields are ignored."""

    class Meta:
        unknown = EXCLUDE

    list_unsubscribe = fields.String(
        data_key="List-Unsubscribe",
        load_default=None,
        validate=validate.OneOf(["One-Click"]),
    )
    form = fields.String(load_default=None, validate=validate.OneOf(["choices"]))
    channels = fields.List(
        fields.String(validate=validate.OneOf(CHANNEL_TYPES)),
        load_default=list,
        validate=validate.Length(max=len(CHANNEL_TYPES)),
    )


class TestSendIn(Schema):
    contact_ids = fields.List(
        fields.UUID(),
        required=True,
        validate=validate.Length(min=1, max=MAX_TEST_CONTACTS),
        metadata={"description": f"1 to {MAX_TEST_CONTACTS} of your contacts"},
    )


class TestSendResultOut(Schema):
    contact_id = fields.UUID(required=True)
    channel = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    outcome = fields.String(
        required=True, metadata={"enum": ["sent", "transient", "permanent", "skipped"]}
    )
    error = fields.String(
        allow_none=True,
        metadata={"description": "the provider's error, or why the message was skipped"},
    )
    provider_message_id = fields.String(allow_none=True)


class TestSendOut(Schema):
    results = fields.List(fields.Nested(TestSendResultOut), required=True)
