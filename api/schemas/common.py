"""Schemas shared by every resource: pagination and the error envelope."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from engine.pagination import DEFAULT_LIMIT, MAX_LIMIT


class PageArgs(Schema):
    limit = fields.Integer(
        load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT)
    )
    cursor = fields.String(load_default=None, validate=validate.Length(max=512))


class ErrorBody(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    fields = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


class ErrorEnvelope(Schema):
    error = fields.Nested(ErrorBody, required=True)


def page_schema(item_schema: type[Schema], name: str) -> type[Schema]:
    """{"items": [...], "next_cursor": ...}: the list shape every resource answers."""
    return Schema.from_dict(
        {
            "items": fields.List(fields.Nested(item_schema), required=True),
            "next_cursor": fields.String(allow_none=True, required=True),
        },
        name=name,
    )


class NormalizedEmail(fields.Email):
    """An email address, trimmed and lower-cased before it is validated and stored."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = value.strip().lower()
        return super()._deserialize(value, attr, data, **kwargs)
