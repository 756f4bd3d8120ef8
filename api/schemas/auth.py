"""Request and response schemas of the auth endpoints."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import NormalizedEmail, page_schema

Password = fields.String  # policy (length, common passwords) is the engine's to judge


class RegisterArgs(Schema):
    email = NormalizedEmail(required=True, validate=validate.Length(max=255))
    password = Password(required=True, load_only=True)
    first_name = fields.String(load_default=None, validate=validate.Length(max=100))
    last_name = fields.String(load_default=None, validate=validate.Length(max=100))
    company_name = fields.String(load_default=None, validate=validate.Length(max=255))


class LoginArgs(Schema):
    email = fields.String(required=True, validate=validate.Length(min=1, max=255))
    password = Password(required=True, load_only=True, validate=validate.Length(max=1024))


class TokenArgs(Schema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=2048))


class EmailArgs(Schema):
    email = NormalizedEmail(required=True, validate=validate.Length(max=255))


class PasswordChangeArgs(Schema):
    current_password = Password(required=True, load_only=True, validate=validate.Length(max=1024))
    new_password = Password(required=True, load_only=True)


class PasswordResetArgs(Schema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    new_password = Password(required=True, load_only=True)


class UserOut(Schema):
    id = fields.UUID(required=True)
    email = fields.String(required=True)
    first_name = fields.String(allow_none=True)
    last_name = fields.String(allow_none=True)
    company_name = fields.String(allow_none=True)
    is_active = fields.Boolean()
    is_verified = fields.Boolean()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    last_login_at = fields.DateTime(allow_none=True)


class TokenPairOut(Schema):
    access_token = fields.String(required=True)
    refresh_token = fields.String(required=True)
    token_type = fields.String(required=True)
    expires_in = fields.Integer(
        required=True, metadata={"description": "access token lifetime (s)"}
    )


class SessionOut(Schema):
    id = fields.UUID(required=True)
    ip_address = fields.String(allow_none=True)
    user_agent = fields.String(allow_none=True)
    created_at = fields.DateTime()
    last_used_at = fields.DateTime(allow_none=True)
    expires_at = fields.DateTime()
    current = fields.Boolean()


SessionPage = page_schema(SessionOut, "SessionPage")


class MessageOut(Schema):
    message = fields.String(required=True)
