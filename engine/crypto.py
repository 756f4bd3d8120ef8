"""Secrets at rest: Fernet encryption under rotatable keys, and masking for display.

ENCRYPTION_KEY holds one or more Fernet keys separated by commas. The first encrypts,
every one decrypts (MultiFernet), so a key is rotated without downtime: put the new key
first and keep the old one after it, run `flask --app api secrets rotate` to re-encrypt
what is stored, then drop the old key.
"""

from __future__ import annotations

import binascii

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from engine.errors import Conflict
from engine.settings import ConfigError, Settings

MASK = "****"
# Only a secret this long shows its last characters: on a shorter one, four characters
# are too large a share of what an attacker would have to guess.
MIN_LENGTH_TO_HINT = 16
HINT_CHARS = 4
# Vendor prefixes that name a token's kind and carry no entropy (Shopify admin, custom
# app, private app tokens and shared secrets). Anything else, including a prefix a user
# chose for their own webhook secret, stays hidden.
PUBLIC_PREFIXES = ("shpat_", "shpca_", "shppa_", "shpss_")


class SecretUnreadable(Conflict):
    """A stored secret that no configured key decrypts: a key was dropped too early, or
    the row was written under another deployment's key. Re-entering the secret fixes it."""

    code = "secret_unreadable"


def parse_keys(raw: str) -> list[Fernet]:
    """The Fernet keys of an ENCRYPTION_KEY value, first (encrypting) key first.

    Raises ConfigError naming the position of a bad key, never the key itself.
    """
    parts = [part.strip() for part in raw.split(",")]
    if not any(parts):
        raise ConfigError("ENCRYPTION_KEY is empty; it needs at least one Fernet key")
    keys: list[Fernet] = []
    for position, part in enumerate(parts, start=1):
        try:
            keys.append(Fernet(part))
        except (ValueError, binascii.Error):
            raise ConfigError(
                f"ENCRYPTION_KEY entry {position} of {len(parts)} is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes; make one with "
                "`python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            ) from None
    return keys


def mask(plaintext: str) -> str:
    """What a response may show of a secret: at most its last four characters."""
    prefix = next((p for p in PUBLIC_PREFIXES if plaintext.startswith(p)), "")
    rest = plaintext[len(prefix) :]
    if len(rest) < MIN_LENGTH_TO_HINT:
        return MASK
    return f"{prefix}{MASK}{rest[-HINT_CHARS:]}"


def looks_masked(value: str) -> bool:
    """True for a value that came from `mask`; real tokens never contain the marker."""
    return MASK in value


class SecretBox:
    """Encrypts, decrypts, rotates and masks secrets with the deployment's keys."""

    def __init__(self, settings: Settings) -> None:
        keys = parse_keys(settings.encryption_key)
        self._current = keys[0]
        self._all = MultiFernet(keys)

    def encrypt(self, plaintext: str) -> str:
        return self._current.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._all.decrypt(token.encode()).decode()
        except (InvalidToken, AttributeError, UnicodeError):
            raise SecretUnreadable(
                "a stored secret cannot be decrypted with the configured ENCRYPTION_KEY"
            ) from None

    def rotate(self, token: str) -> str:
        """The same secret encrypted under the first key (its timestamp is kept)."""
        try:
            return self._all.rotate(token.encode()).decode()
        except (InvalidToken, AttributeError):
            raise SecretUnreadable(
                "a stored secret cannot be decrypted with the configured ENCRYPTION_KEY"
            ) from None

    def is_current(self, token: str) -> bool:
        """True when the first key alone decrypts the token: rotating it would be moot."""
        try:
            self._current.decrypt(token.encode())
        except (InvalidToken, AttributeError):
            return False
        return True

    @staticmethod
    def mask(plaintext: str) -> str:
        return mask(plaintext)
