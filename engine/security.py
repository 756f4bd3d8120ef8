"""Password hashing, password policy, and signed one-purpose tokens.

Argon2id (argon2-cffi) because it is memory-hard and its encoded hash carries its own
parameters, so raising them later only needs `needs_rehash` at login.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 256

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so unknown emails cost the same
    time as known ones. Computed on the first login of an unknown email, not at import: every worker
    imports this module, and one Argon2id hash takes 64 MiB, which set every worker
    parent's peak RSS."""
    return _hasher.hash("herald-timing-equaliser")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        verified = _hasher.verify(password_hash or _dummy_hash(), password)
        return verified and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    # zxcvbn ships the ~30k most common leaked passwords; loading is lazy and once.
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def password_problems(password: str, *, email: str | None = None) -> list[str]:
    """Why this password is unacceptable; empty when it is fine."""
    problems: list[str] = []
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        problems.append(f"must be at most {MAX_PASSWORD_LENGTH} characters")
    lowered = password.lower()
    if lowered in _common_passwords() or len(set(lowered)) <= 2:
        problems.append("is too common")
    if email and lowered in {email.lower(), email.split("@")[0].lower()}:
        problems.append("must not be your email address")
    return problems


def token_digest(token: str) -> str:
    """Stored instead of a bearer token, so a database leak cannot be replayed."""
    return hashlib.sha256(token.encode()).hexdigest()


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class SignedTokens:
    """Short, URL-safe, expiring tokens for email links (verification, password reset).

    Stateless: the signature proves we issued it; what it binds (an email, a password
    hash fingerprint) makes it single-purpose and, for resets, single-use.
    """

    def __init__(self, secret_key: str) -> None:
        self._secret_key = secret_key

    def _serializer(self, purpose: str) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(self._secret_key, salt=f"herald.{purpose}")

    def dumps(self, purpose: str, payload: dict) -> str:
        return self._serializer(purpose).dumps(payload)

    def loads(self, purpose: str, token: str, max_age: int) -> dict | None:
        try:
            data = self._serializer(purpose).loads(token, max_age=max_age)
        except (SignatureExpired, BadSignature):
            return None
        return data if isinstance(data, dict) else None
