"""/api/v1/auth: registration, verification, login with rotating refresh tokens,
logout, password change and reset, and the user's own sessions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from flask import request
from flask_jwt_extended import current_user, get_jwt
from flask_smorest import Blueprint

from api.extensions import db
from api.jwt_setup import mint_tokens, presented_token
from api.openapi import login_required
from api.runtime import clock, enqueue_system_email, settings, throttle
from api.schemas.auth import (
    EmailArgs,
    LoginArgs,
    MessageOut,
    PasswordChangeArgs,
    PasswordResetArgs,
    RegisterArgs,
    SessionPage,
    TokenArgs,
    TokenPairOut,
    UserOut,
)
from api.schemas.common import PageArgs
from engine.errors import AuthenticationFailed, Conflict
from engine.models import UserSession
from engine.pagination import paginate
from engine.services import auth

blp = Blueprint("auth", __name__, url_prefix="/api/v1/auth", description="Accounts and sessions")


def _client_ip() -> str:
    # Behind a proxy, deploy with werkzeug's ProxyFix so remote_addr is the client.
    return request.remote_addr or "unknown"


def _token_pair(access: str, refresh: str) -> dict:
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": settings().jwt_access_token_expires,
    }


def _session_id() -> uuid.UUID | None:
    sid = get_jwt().get("sid")
    return uuid.UUID(sid) if sid else None


@blp.post("/register")
@blp.arguments(RegisterArgs)
@blp.response(201, UserOut)
def register(args: dict):
    """Create an account; a verification token is emailed to it."""
    user = auth.register_user(db.session, **args)
    enqueue_system_email(auth.verification_email(settings(), user))
    return user


@blp.post("/verify")
@blp.arguments(TokenArgs)
@blp.response(200, UserOut)
def verify(args: dict):
    """Mark the account verified with the emailed token."""
    return auth.verify_email(db.session, settings(), args["token"])


@blp.post("/verify/resend")
@login_required
@blp.response(202, MessageOut)
def resend_verification():
    """Email a new verification token to the signed-in user."""
    if current_user.is_verified:
        raise Conflict("this account is already verified", code="already_verified")
    enqueue_system_email(auth.verification_email(settings(), current_user))
    return {"message": "verification email sent"}


@blp.post("/login")
@blp.arguments(LoginArgs)
@blp.response(200, TokenPairOut)
def login(args: dict):
    """Exchange email and password for an access/refresh pair.

    Failures are throttled per account and per client IP (429 with Retry-After); an
    unknown email and a wrong password answer the same 401.
    """
    email, ip = auth.normalize_email(args["email"]), _client_ip()
    limiter = throttle()
    limiter.check(email, ip)
    user = auth.authenticate(db.session, email, args["password"])
    if user is None:
        limiter.record_failure(email, ip)
        raise AuthenticationFailed("invalid email or password", code="invalid_credentials")
    limiter.record_success(email)
    now = clock().now()
    access, tokens = mint_tokens(user.id, uuid.uuid4())
    auth.open_session(
        db.session,
        user,
        tokens,
        ip_address=ip if ip != "unknown" else None,
        user_agent=request.headers.get("User-Agent"),
        expires_at=auth.session_expiry(settings(), now),
        now=now,
    )
    return _token_pair(access, tokens.refresh_token)


@blp.post("/refresh")
@login_required(refresh=True)
@blp.response(200, TokenPairOut)
def refresh():
    """Rotate: a new pair for the refresh token, which stops working.

    Presenting a refresh token that was already rotated or revoked revokes every
    session of the account (it was probably stolen) and answers 401.
    """
    session_id = _session_id()
    if session_id is None:
        raise AuthenticationFailed("refresh token has no session", code="invalid_token")
    now = clock().now()
    access, tokens = mint_tokens(current_user.id, session_id)
    rotated = auth.rotate_session(
        db.session,
        user_id=current_user.id,
        presented_refresh_token=presented_token(),
        new_tokens=tokens,
        expires_at=auth.session_expiry(settings(), now),
        now=now,
    )
    if not rotated:
        db.session.commit()  # the revocation must outlive the 401 below
        raise AuthenticationFailed(
            "refresh token was already used or revoked; all sessions were signed out",
            code="token_reused",
        )
    return _token_pair(access, tokens.refresh_token)


@blp.post("/logout")
@login_required
@blp.response(204)
def logout():
    """Revoke this session: neither its access nor its refresh token works again."""
    claims = get_jwt()
    auth.logout(
        db.session,
        user_id=current_user.id,
        session_id=_session_id(),
        access_jti=claims["jti"],
        access_expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        now=clock().now(),
    )


@blp.get("/me")
@login_required
@blp.response(200, UserOut)
def me():
    return current_user


@blp.post("/password")
@login_required
@blp.arguments(PasswordChangeArgs)
@blp.response(200, UserOut)
def change_password(args: dict):
    """Change the password; every other session is signed out."""
    return auth.change_password(
        db.session,
        current_user,
        current_password=args["current_password"],
        new_password=args["new_password"],
        keep_session_id=_session_id(),
        now=clock().now(),
    )


@blp.post("/password/reset-request")
@blp.arguments(EmailArgs)
@blp.response(202, MessageOut)
def request_password_reset(args: dict):
    """Email a reset token if the account exists; the answer never says whether it does."""
    user = auth.find_user_by_email(db.session, args["email"])
    if user is not None and user.is_active:
        enqueue_system_email(auth.password_reset_email(settings(), user))
    return {"message": "if the account exists, a reset email is on its way"}


@blp.post("/password/reset")
@blp.arguments(PasswordResetArgs)
@blp.response(200, UserOut)
def reset_password(args: dict):
    """Set a new password with an emailed token; every session is signed out."""
    return auth.reset_password(
        db.session, settings(), args["token"], args["new_password"], clock().now()
    )


@blp.get("/sessions")
@login_required
@blp.arguments(PageArgs, location="query")
@blp.response(200, SessionPage)
def list_sessions(args: dict):
    """The signed-in user's live sessions, newest first."""
    page = paginate(
        db.session,
        auth.list_live_sessions(db.session, current_user.id, clock().now()),
        UserSession,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    current = _session_id()
    for row in page.items:
        row.current = row.id == current  # a plain attribute for the response only
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.delete("/sessions/<uuid:session_id>")
@login_required
@blp.response(204)
def revoke_session(session_id: uuid.UUID):
    """Sign one session out; another user's session id answers 404."""
    auth.revoke_one_session(db.session, current_user.id, session_id, clock().now())
