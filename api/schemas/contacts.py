"""Request and response schemas of the contact endpoints.

A contact's fields are judged by engine.contacts.validation (types, E.164 phones, IANA
time zones, sizes), the one judge for a contact whether it comes alone, in bulk or
from a CSV line; the input schema here refuses unknown fields and documents the rest.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.contacts.validation import (
    CONSENT_CHANNELS,
    MAX_ATTRIBUTES,
    MAX_ATTRIBUTES_BYTES,
    MAX_EMAIL,
    MAX_EXTERNAL_ID,
    MAX_LOCALE,
    MAX_NAME,
    MAX_PUSH_TOKEN_LENGTH,
    MAX_PUSH_TOKENS,
)
from engine.services.contacts import MAX_BULK_CONTACTS


class ConsentOut(Schema):
    email = fields.Boolean(attribute="consent_email", required=True)
    sms = fields.Boolean(attribute="consent_sms", required=True)
    push = fields.Boolean(attribute="consent_push", required=True)
    whatsapp = fields.Boolean(attribute="consent_whatsapp", required=True)


class _OwnConsent(fields.Nested):
    """Dumps the four consent_* columns of the object itself as one nested object."""

    def get_value(self, obj, attr, accessor=None, default=None):
        return obj


def _documented(type_: str, description: str, **schema) -> fields.Raw:
    """A field marshmallow passes through as given and OpenAPI documents as `type_`;
    engine.contacts.validation judges it, so every bad field is named in one answer."""
    return fields.Raw(
        allow_none=True, metadata={"type": type_, "description": description, **schema}
    )


def _text(description: str, max_length: int | None = None) -> fields.Raw:
    limits = {"maxLength": max_length} if max_length else {}
    return _documented("string", description, nullable=True, **limits)


class ContactArgs(Schema):
    """A contact to create, or the fields to change (PATCH: absent fields stay).

    Only unknown fields are refused here; types and rules are checked by the engine,
    the same judge as for bulk rows and CSV lines.
    """

    external_id = _text("Your id for this person; unique per account.", MAX_EXTERNAL_ID)
    email = _text("Trimmed and lower-cased; unique per account.", MAX_EMAIL)
    phone = _text("International format (+ and country code), stored as E.164.")
    whatsapp = _text("International format (+ and country code), stored as E.164.")
    push_tokens = _documented(
        "array",
        f"Device tokens, replacing the stored list; duplicates dropped, at most {MAX_PUSH_TOKENS}.",
        items={"type": "string", "maxLength": MAX_PUSH_TOKEN_LENGTH},
    )
    first_name = _text("", MAX_NAME)
    last_name = _text("", MAX_NAME)
    timezone = _text("An IANA time zone such as Europe/Paris.")
    locale = _text("A BCP 47 tag such as fr or pt-BR.", MAX_LOCALE)
    attributes = _documented(
        "object",
        f"Any JSON object (at most {MAX_ATTRIBUTES} keys, {MAX_ATTRIBUTES_BYTES // 1024} KB). "
        "On update it merges into the stored one key by key; a null value removes that key.",
    )
    consent = _documented(
        "object",
        "Per-channel consent; channels not given are false on create, unchanged on update.",
        properties={channel: {"type": "boolean"} for channel in CONSENT_CHANNELS},
        additionalProperties=False,
    )


class ContactOut(Schema):
    id = fields.UUID(required=True)
    external_id = fields.String(allow_none=True)
    email = fields.String(allow_none=True)
    phone = fields.String(allow_none=True)
    whatsapp = fields.String(allow_none=True)
    push_tokens = fields.List(fields.String(), required=True)
    first_name = fields.String(allow_none=True)
    last_name = fields.String(allow_none=True)
    timezone = fields.String(allow_none=True)
    locale = fields.String(allow_none=True)
    attributes = fields.Dict(keys=fields.String(), required=True)
    consent = _OwnConsent(ConsentOut, required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


ContactPage = page_schema(ContactOut, "ContactPage")


class ContactListArgs(PageArgs):
    email = fields.String(metadata={"description": "Exact address (case-insensitive)."})
    external_id = fields.String()
    attribute = fields.List(
        fields.String(),
        metadata={
            "description": "key:value, repeatable (all must match): the attribute's value "
            'read as text equals value, so age:42 matches 42 and "42".'
        },
    )


class BulkArgs(Schema):
    contacts = fields.List(
        fields.Dict(),
        required=True,
        validate=validate.Length(min=1, max=MAX_BULK_CONTACTS),
        metadata={
            "description": f"Up to {MAX_BULK_CONTACTS} contacts, each shaped like ContactArgs "
            "and matched on external_id, else email (one of the two is required)."
        },
    )


class BulkRowOut(Schema):
    index = fields.Integer(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["created", "updated", "rejected"])
    )
    id = fields.UUID(
        attribute="contact_id",
        allow_none=True,
        required=True,
        metadata={"description": "null when rejected"},
    )
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        required=True,
        metadata={"description": "Field path (within the row) to messages; empty unless rejected."},
    )


class BulkOut(Schema):
    created = fields.Integer(required=True)
    updated = fields.Integer(required=True)
    rejected = fields.Integer(required=True)
    results = fields.List(fields.Nested(BulkRowOut), required=True, attribute="outcomes")


class ImportErrorOut(Schema):
    row = fields.Integer(
        allow_none=True,
        required=True,
        metadata={"description": "1 is the first line after the header; null: the whole import."},
    )
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()), required=True)


class ImportOut(Schema):
    id = fields.UUID(required=True)
    filename = fields.String(allow_none=True)
    status = fields.String(
        required=True,
        metadata={"description": "queued, running, completed or failed"},
    )
    total_rows = fields.Integer(required=True)
    rows_done = fields.Integer(required=True)
    created = fields.Integer(attribute="created_count", required=True)
    updated = fields.Integer(attribute="updated_count", required=True)
    rejected = fields.Integer(attribute="rejected_count", required=True)
    errors = fields.List(
        fields.Nested(ImportErrorOut),
        required=True,
        metadata={"description": "The first 100 rejected rows and why."},
    )
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)
    finished_at = fields.DateTime(allow_none=True)


ImportPage = page_schema(ImportOut, "ImportPage")

# multipart/form-data is read as a stream by the view (never parsed by webargs, which
# would buffer the file), so its request body is documented by hand.
IMPORT_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "UTF-8 CSV with a header line; see the import "
                        "documentation for the columns.",
                    }
                },
            }
        }
    },
}
