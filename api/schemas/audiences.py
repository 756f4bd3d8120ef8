"""Request and response schemas of campaign audiences and recipient counts.

The definition is checked here only for being a JSON object; its rules (operators,
types, limits, owned data sources) are the engine's to judge, with the exact path of
each problem (definition.all[2].op).
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import page_schema

DEFINITION_DOC = {
    "description": (
        "Rule tree. Nodes: {all: [...]}, {any: [...]}, {not: {...}}; "
        "{field, op, value} on email, phone, whatsapp, first_name, last_name, timezone, "
        "locale, external_id, created_at or attributes.<key>[.<key>…] with op one of eq, ne, "
        "in, not_in, contains, gt, gte, lt, lte, exists; {consent: channel}; "
        "{event, where: [{field, op, value}], min_count, max_count, within_days, performed}; "
        "{source_id}; {contact_ids: [...]}. {all: []} is every contact. A condition on a "
        "missing or wrongly typed value is false; not negates. At most 8 levels, 200 "
        "conditions, 10,000 contact ids and 1,000 in/not_in values."
    ),
    "example": {
        "all": [
            {"field": "attributes.tier", "op": "eq", "value": "gold"},
            {"consent": "email"},
            {
                "event": "order_placed",
                "where": [{"field": "value", "op": "gte", "value": 50}],
                "min_count": 1,
                "within_days": 30,
            },
            {"not": {"field": "attributes.country", "op": "in", "value": ["FR", "BE"]}},
        ]
    },
}


def _name(required: bool) -> fields.String:
    return fields.String(
        required=required, validate=validate.Length(min=1, max=255), metadata={"example": "VIPs"}
    )


class AudienceArgs(Schema):
    name = _name(required=True)
    definition = fields.Dict(keys=fields.String(), required=True, metadata=DEFINITION_DOC)


class AudiencePatchArgs(Schema):
    name = _name(required=False)
    definition = fields.Dict(keys=fields.String(), metadata=DEFINITION_DOC)


class AudienceOut(Schema):
    id = fields.UUID(required=True)
    campaign_id = fields.UUID(required=True)
    name = fields.String(required=True)
    definition = fields.Dict(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


AudiencePage = page_schema(AudienceOut, "AudiencePage")


class EstimateOut(Schema):
    count = fields.Integer(required=True, metadata={"description": "contacts matched now"})


class RecipientCountsOut(Schema):
    total = fields.Integer(
        required=True, metadata={"description": "contacts in the union of the audiences"}
    )
    email = fields.Integer(required=True)
    sms = fields.Integer(required=True)
    push = fields.Integer(required=True)
    whatsapp = fields.Integer(required=True)
    channels = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        required=True,
        metadata={"description": "the same counts for the channels the campaign has"},
    )
