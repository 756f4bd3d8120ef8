"""engine.crypto on its own: key parsing, encryption, rotation and masking."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from engine.crypto import MASK, SecretBox, SecretUnreadable, looks_masked, mask
from engine.settings import DEV_ENCRYPTION_KEY, ConfigError, Settings

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()


def box(keys: str) -> SecretBox:
    return SecretBox(Settings(encryption_key=keys))


def test_round_trip_and_ciphertext_hides_the_plaintext():
    secretbox = box(DEV_ENCRYPTION_KEY)
    token = secretbox.encrypt("shpat_0123456789abcdef0123456789abcdef")
    assert token.startswith("gAAAAA")
    assert "0123456789abcdef" not in token
    assert secretbox.decrypt(token) == "shpat_0123456789abcdef0123456789abcdef"
    # Fernet uses a fresh IV each time: equal secrets do not give equal ciphertexts.
    assert secretbox.encrypt("same") != secretbox.encrypt("same")


def test_first_key_encrypts_every_key_decrypts_and_rotate_moves_to_the_first():
    old_only = box(OLD)
    token = old_only.encrypt("webhook-secret-value")
    both = box(f"{NEW}, {OLD}")
    assert both.decrypt(token) == "webhook-secret-value"
    assert not both.is_current(token)

    fresh = both.encrypt("another")
    assert Fernet(NEW.encode()).decrypt(fresh.encode()) == b"another"
    assert both.is_current(fresh)

    rotated = both.rotate(token)
    assert both.is_current(rotated)
    assert box(NEW).decrypt(rotated) == "webhook-secret-value"
    with pytest.raises(SecretUnreadable):
        old_only.decrypt(rotated)


def test_a_token_no_key_decrypts_is_a_clear_domain_error():
    token = box(OLD).encrypt("secret")
    with pytest.raises(SecretUnreadable) as caught:
        box(NEW).decrypt(token)
    assert caught.value.code == "secret_unreadable"
    assert "ENCRYPTION_KEY" in caught.value.message
    for junk in ("", "not-a-token", "gAAAAAbroken"):
        with pytest.raises(SecretUnreadable):
            box(NEW).decrypt(junk)
        with pytest.raises(SecretUnreadable):
            box(NEW).rotate(junk)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("", "empty"),
        (" , ", "empty"),
        ("k" * 44, "entry 1 of 1"),
        (f"{NEW},not-a-key", "entry 2 of 2"),
        (f"{NEW},", "entry 2 of 2"),
    ],
)
def test_invalid_keys_are_a_config_error_that_does_not_echo_them(keys, message):
    with pytest.raises(ConfigError, match=message) as caught:
        box(keys)
    assert "Fernet" in str(caught.value) or "empty" in str(caught.value)
    assert "not-a-key" not in str(caught.value) and "k" * 44 not in str(caught.value)


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("shpat_0123456789abcdef0123456789abcd12", "shpat_****cd12"),
        ("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", "shpss_****32ff"),
        ("EAAGm0PX4ZCpsBAKZAqwerty1234", "****1234"),
        ("0123456789abcdef", "****cdef"),  # exactly the threshold
        ("0123456789abcde", MASK),  # one short: nothing shows
        ("shpat_short", MASK),
        ("mysecret_0123456789abcdefXYZW", "****XYZW"),  # a user's prefix stays hidden
        ("", MASK),
    ],
)
def test_mask_shows_at_most_the_last_four_characters(secret, shown):
    assert mask(secret) == shown
    assert SecretBox.mask(secret) == shown
    assert looks_masked(shown)
    assert len(shown.replace(MASK, "").removeprefix("shpat_").removeprefix("shpss_")) <= 4
