"""flask-jwt-extended wiring: configuration, token minting, and the loaders that
turn every JWT failure into the API's one error shape.

Each token carries `sid`, its login session's id. An access token is refused when
its jti is blacklisted (logout) or its session was revoked (rotation reuse, password
change, session deletion), checked in one query per request.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from flask import Flask, g, request
from flask_jwt_extended import create_access_token, create_refresh_token

from api.errors import error_response
from api.extensions import db, jwt
from engine.services import auth
from engine.services.auth import SessionTokens
from engine.settings import Settings


def configure_jwt(app: Flask, settings: Settings) -> None:
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret_key,
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(seconds=settings.jwt_access_token_expires),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(seconds=settings.jwt_refresh_token_expires),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_ERROR_MESSAGE_KEY="message",
    )
    jwt.init_app(app)


def mint_tokens(user_id: uuid.UUID, session_id: uuid.UUID) -> tuple[str, SessionTokens]:
    """A fresh access/refresh pair bound to one session; returns (access, session tokens)."""
    access_jti = str(uuid.uuid4())
    claims = {"sid": str(session_id)}
    access = create_access_token(
        identity=str(user_id), additional_claims={**claims, "jti": access_jti}
    )
    refresh = create_refresh_token(identity=str(user_id), additional_claims=claims)
    return access, SessionTokens(
        session_id=session_id, refresh_token=refresh, access_jti=access_jti
    )


def presented_token() -> str:
    header = request.headers.get("Authorization", "")
    return header.split(None, 1)[1].strip() if " " in header else ""


@jwt.token_in_blocklist_loader
def _is_revoked(_header: dict, payload: dict) -> bool:
    if payload.get("type") == "refresh":
        # The refresh endpoint judges refresh tokens itself: a revoked one presented
        # again is evidence of theft and must revoke every session, not just fail.
        return False
    # One query answers both "is it revoked?" and "who is it?"; keep the user for
    # the lookup below instead of asking the database twice.
    g.token_user = auth.user_for_access_token(
        db.session, payload["sub"], payload["jti"], payload.get("sid")
    )
    return g.token_user is None


@jwt.user_lookup_loader
def _load_user(_header: dict, payload: dict):
    if payload.get("type") != "refresh":
        return g.pop("token_user", None)
    user = auth.get_user(db.session, payload["sub"])
    return user if user is not None and user.is_active else None


@jwt.user_lookup_error_loader
def _user_gone(_header: dict, _payload: dict):
    return error_response(401, "unauthorized", "the account behind this token no longer exists")


@jwt.unauthorized_loader
def _missing_token(reason: str):
    return error_response(401, "unauthorized", f"authentication required: {reason}")


@jwt.invalid_token_loader
def _invalid_token(reason: str):
    return error_response(401, "invalid_token", f"invalid token: {reason}")


@jwt.expired_token_loader
def _expired_token(_header: dict, _payload: dict):
    return error_response(401, "token_expired", "token has expired")


@jwt.revoked_token_loader
def _revoked_token(_header: dict, _payload: dict):
    return error_response(401, "token_revoked", "token has been revoked")


@jwt.needs_fresh_token_loader
def _needs_fresh(_header: dict, _payload: dict):
    return error_response(401, "fresh_token_required", "a fresh login is required")


@jwt.token_verification_failed_loader
def _verification_failed(_header: dict, _payload: dict):
    return error_response(401, "invalid_token", "token verification failed")
