"""Accounts, login sessions and token revocation.

A login opens one `user_sessions` row that lives across refresh-token rotation. Only the
digest of the current refresh token is kept; rotating it is a compare-and-set on that
digest, so a refresh token presented a second time (stolen and replayed, or raced) can
never win and instead revokes every session of the account.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.db import insert_ignoring_conflicts
from engine.errors import Conflict, NotFound, ValidationFailed
from engine.mail import SystemEmail
from engine.models import TokenBlacklist, User, UserSession
from engine.security import (
    SignedTokens,
    hash_password,
    password_needs_rehash,
    password_problems,
    token_digest,
    verify_password,
)
from engine.settings import Settings

VERIFY_PURPOSE = "verify-email"
RESET_PURPOSE = "reset-password"
VERIFY_TOKEN_MAX_AGE = 3 * 24 * 3600
RESET_TOKEN_MAX_AGE = 3600


def normalize_email(email: str) -> str:
    return email.strip().lower()


def _password_fingerprint(password_hash: str) -> str:
    # Binding a reset token to the current hash makes it single-use: once the password
    # changes, every outstanding reset token stops matching.
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _check_password(password: str, email: str, field: str = "password") -> None:
    problems = password_problems(password, email=email)
    if problems:
        raise ValidationFailed("password rejected", fields={field: problems})


# -- accounts -----------------------------------------------------------------------


def register_user(
    session: Session,
    *,
    email: str,
    password: str,
    first_name: str | None = None,
    last_name: str | None = None,
    company_name: str | None = None,
    verified: bool = False,
) -> User:
    email = normalize_email(email)
    _check_password(password, email)
    taken = Conflict(
        "an account with this email already exists",
        code="email_taken",
        fields={"email": ["already registered"]},
    )
    if session.scalar(select(exists().where(User.email == email))):
        raise taken
    user = User(
        email=email,
        password_hash=hash_password(password),
        first_name=first_name,
        last_name=last_name,
        company_name=company_name,
        is_verified=verified,
    )
    try:
        with session.begin_nested():  # a concurrent registration loses on the unique key
            session.add(user)
    except IntegrityError as exc:
        raise taken from exc
    return user


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The user, or None; unknown email and wrong password take the same time."""
    user = session.scalar(select(User).where(User.email == normalize_email(email)))
    ok = verify_password(user.password_hash if user else None, password)
    if not ok or user is None or not user.is_active:
        return None
    if password_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def get_user(session: Session, user_id: uuid.UUID | str) -> User | None:
    try:
        key = uuid.UUID(str(user_id))
    except ValueError:
        return None
    return session.get(User, key)


def find_user_by_email(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == normalize_email(email)))


def mark_verified(session: Session, user: User) -> User:
    user.is_verified = True
    return user


# -- email-link tokens --------------------------------------------------------------


def verification_email(settings: Settings, user: User) -> SystemEmail:
    token = SignedTokens(settings.secret_key).dumps(
        VERIFY_PURPOSE, {"uid": str(user.id), "email": user.email}
    )
    return SystemEmail(
        to=user.email,
        subject="Verify your Herald account",
        text=(
            "Welcome to Herald.\n\n"
            "Confirm your email address by sending this token to "
            f'POST {settings.public_base_url}/api/v1/auth/verify as {{"token": "..."}}:\n\n'
            f"verification token: {token}\n\n"
            "It expires in 3 days.\n"
        ),
    )


def verify_email(session: Session, settings: Settings, token: str) -> User:
    data = SignedTokens(settings.secret_key).loads(VERIFY_PURPOSE, token, VERIFY_TOKEN_MAX_AGE)
    user = get_user(session, data.get("uid", "")) if data else None
    if user is None or user.email != data.get("email"):
        raise ValidationFailed(
            "invalid or expired verification token", fields={"token": ["invalid or expired"]}
        )
    return mark_verified(session, user)


def password_reset_email(settings: Settings, user: User) -> SystemEmail:
    token = SignedTokens(settings.secret_key).dumps(
        RESET_PURPOSE, {"uid": str(user.id), "fp": _password_fingerprint(user.password_hash)}
    )
    return SystemEmail(
        to=user.email,
        subject="Reset your Herald password",
        text=(
            "Someone asked to reset the password of this Herald account. If it was not you, "
            "ignore this message.\n\n"
            f"Send this token with your new password to POST "
            f"{settings.public_base_url}/api/v1/auth/password/reset:\n\n"
            f"reset token: {token}\n\nIt expires in 1 hour and works once.\n"
        ),
    )


def reset_password(
    session: Session, settings: Settings, token: str, new_password: str, now: datetime
) -> User:
    data = SignedTokens(settings.secret_key).loads(RESET_PURPOSE, token, RESET_TOKEN_MAX_AGE)
    user = get_user(session, data.get("uid", "")) if data else None
    if user is None or _password_fingerprint(user.password_hash) != data.get("fp"):
        raise ValidationFailed(
            "invalid or expired reset token", fields={"token": ["invalid or expired"]}
        )
    _check_password(new_password, user.email, field="new_password")
    user.password_hash = hash_password(new_password)
    revoke_sessions(session, user.id, now=now)
    return user


def change_password(
    session: Session,
    user: User,
    *,
    current_password: str,
    new_password: str,
    keep_session_id: uuid.UUID | None,
    now: datetime,
) -> User:
    if not verify_password(user.password_hash, current_password):
        raise ValidationFailed(
            "current password is wrong", fields={"current_password": ["is wrong"]}
        )
    _check_password(new_password, user.email, field="new_password")
    user.password_hash = hash_password(new_password)
    revoke_sessions(session, user.id, now=now, keep=keep_session_id)
    return user


# -- sessions -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionTokens:
    """What a login or a rotation hands back to the adapter that minted the JWTs."""

    session_id: uuid.UUID
    refresh_token: str
    access_jti: str


def open_session(
    session: Session,
    user: User,
    tokens: SessionTokens,
    *,
    ip_address: str | None,
    user_agent: str | None,
    expires_at: datetime,
    now: datetime,
) -> UserSession:
    user.last_login_at = now
    row = UserSession(
        id=tokens.session_id,
        user_id=user.id,
        refresh_token_hash=token_digest(tokens.refresh_token),
        access_token_jti=tokens.access_jti,
        ip_address=ip_address,
        user_agent=(user_agent or "")[:1000] or None,
        expires_at=expires_at,
        last_used_at=now,
    )
    session.add(row)
    return row


def rotate_session(
    session: Session,
    *,
    user_id: uuid.UUID,
    presented_refresh_token: str,
    new_tokens: SessionTokens,
    expires_at: datetime,
    now: datetime,
) -> bool:
    """Swap the session's refresh token for a new one; False means reuse was detected.

    The UPDATE only matches while the presented token is still the current one and the
    session is live, so of two racing refreshes with the same token exactly one wins.
    On False the caller must commit (the revocation is the point) and refuse.
    """
    result = session.execute(
        update(UserSession)
        .where(
            UserSession.id == new_tokens.session_id,
            UserSession.user_id == user_id,
            UserSession.refresh_token_hash == token_digest(presented_refresh_token),
            UserSession.revoked_at.is_(None),
            UserSession.expires_at > now,
        )
        .values(
            refresh_token_hash=token_digest(new_tokens.refresh_token),
            access_token_jti=new_tokens.access_jti,
            expires_at=expires_at,
            last_used_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        return True
    revoke_sessions(session, user_id, now=now)
    return False


def revoke_sessions(
    session: Session,
    user_id: uuid.UUID,
    *,
    now: datetime,
    only: uuid.UUID | None = None,
    keep: uuid.UUID | None = None,
) -> int:
    """Revoke live sessions of a user (one, all, or all but one) in one statement.

    Access tokens carry their session id, and `is_access_token_revoked` checks it, so
    revoking a session ends its access tokens at once, not at their expiry.
    """
    conditions = [UserSession.user_id == user_id, UserSession.revoked_at.is_(None)]
    if only is not None:
        conditions.append(UserSession.id == only)
    if keep is not None:
        conditions.append(UserSession.id != keep)
    result = session.execute(
        update(UserSession)
        .where(*conditions)
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def revoke_one_session(
    session: Session, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime
) -> None:
    row = session.scalar(
        select(UserSession).where(UserSession.id == session_id, UserSession.user_id == user_id)
    )
    if row is None:
        raise NotFound("session not found")
    revoke_sessions(session, user_id, now=now, only=session_id)


def list_live_sessions(session: Session, user_id: uuid.UUID, now: datetime):
    """A select of the user's live sessions, newest first; the caller paginates it."""
    return select(UserSession).where(
        UserSession.user_id == user_id,
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > now,
    )


def logout(
    session: Session,
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID | None,
    access_jti: str,
    access_expires_at: datetime,
    now: datetime,
) -> None:
    insert_ignoring_conflicts(
        session,
        TokenBlacklist,
        [
            {
                "id": uuid.uuid4(),
                "jti": access_jti,
                "token_type": "access",
                "user_id": user_id,
                "expires_at": access_expires_at,
            }
        ],
        index_elements=["jti"],
    )
    if session_id is not None:
        revoke_sessions(session, user_id, now=now, only=session_id)


def user_for_access_token(
    session: Session, user_id: str, jti: str, session_id: str | None
) -> User | None:
    """The token's user if the token still stands, else None; one query per request.

    Every authenticated request runs this, so it folds the three checks (user active,
    jti not blacklisted by a logout, login session not revoked) into a single round trip
    instead of a blocklist query followed by a user lookup.
    """
    try:
        uid = uuid.UUID(user_id)
        sid = uuid.UUID(session_id) if session_id is not None else None
    except ValueError:
        return None
    conditions = [
        User.id == uid,
        User.is_active.is_(True),
        ~exists().where(TokenBlacklist.jti == jti),
    ]
    if sid is not None:
        conditions.append(
            exists().where(and_(UserSession.id == sid, UserSession.revoked_at.is_(None)))
        )
    return session.scalar(select(User).where(*conditions))


def purge_expired_tokens(session: Session, now: datetime) -> dict[str, int]:
    """Drop blacklist rows and sessions past expiry; both are useless after it.

    Revoked sessions stay until they expire, so a replayed refresh token is still
    recognised as reuse rather than as an unknown token.
    """
    blacklist = session.execute(delete(TokenBlacklist).where(TokenBlacklist.expires_at < now))
    sessions = session.execute(delete(UserSession).where(UserSession.expires_at < now))
    return {"blacklist": blacklist.rowcount, "sessions": sessions.rowcount}


def session_expiry(settings: Settings, now: datetime) -> datetime:
    return now + timedelta(seconds=settings.jwt_refresh_token_expires)
