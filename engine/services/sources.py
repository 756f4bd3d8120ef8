"""Data sources: their config (secrets encrypted at rest, masked on the way out), their
public ingest keys, and the re-encryption of every stored secret after a key rotation.

A secret value is stored inside `config` as {"ciphertext": "<Fernet token>"} in place
of the plaintext; the other values are stored as given (normalized). Only
`decrypted_config` ever returns a plaintext secret, and no API response is built from it.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, case, literal, select, update
from sqlalchemy.orm import Session

from engine.crypto import MASK, SecretBox, SecretUnreadable, looks_masked
from engine.errors import Conflict, ValidationFailed
from engine.models import DataSource
from engine.services.ownership import get_owned
from engine.sources.config import INGEST_KEY_TYPES, config_keys, secret_keys, types_with_secrets

# "error" is the sync engine's verdict; a user clears it by setting the source active.
USER_SETTABLE_STATUSES = ("active", "paused")
CIPHERTEXT = "ciphertext"
INGEST_KEY_BYTES = 32  # token_urlsafe(32) is 43 characters, within String(64)


@dataclass(frozen=True)
class SourceView:
    """A source as a response may show it: secrets masked, unreadable ones named."""

    id: uuid.UUID
    name: str
    source_type: str
    status: str
    config: dict[str, Any]
    unreadable_secrets: list[str]
    ingest_key: str | None
    last_sync_at: datetime | None
    created_at: datetime
    updated_at: datetime


def _ciphertext(stored: Any) -> str | None:
    if isinstance(stored, dict) and isinstance(stored.get(CIPHERTEXT), str):
        return stored[CIPHERTEXT]
    return None


def _stored_mask(box: SecretBox, stored: Any) -> str:
    token = _ciphertext(stored)
    if token is None:
        return MASK
    try:
        return box.mask(box.decrypt(token))
    except SecretUnreadable:
        return MASK


def _merge_config(
    box: SecretBox, source_type: str, stored: dict[str, Any], changes: dict[str, Any]
) -> dict[str, Any]:
    """`stored` with `changes` applied, key by key, secrets encrypted.

    A key left out keeps its value and null removes an optional one (JSON merge patch,
    one level deep). A secret sent back exactly as masked keeps the stored secret, so a
    client may PATCH back the config it was shown; any other masked-looking value is
    refused rather than stored as if it were the secret.
    """
    keys = config_keys(source_type)
    errors: dict[str, list[str]] = {}
    merged = dict(stored)
    for name, value in changes.items():
        path = f"config.{name}"
        key = keys.get(name)
        if key is None:
            errors[path] = ["Unknown field."]
        elif value is None:
            if key.required:
                errors[path] = ["Field may not be null."]
            else:
                merged.pop(name, None)
        elif key.secret and isinstance(value, str) and looks_masked(value):
            if name not in stored or value != _stored_mask(box, stored[name]):
                errors[path] = [
                    "is a masked value; send the secret itself, or leave the field out "
                    "to keep the stored one"
                ]
        else:
            try:
                clean = key.check(value)
            except ValueError as exc:
                errors[path] = [str(exc)]
                continue
            merged[name] = {CIPHERTEXT: box.encrypt(clean)} if key.secret else clean
    for name, key in keys.items():
        if key.required and name not in merged and f"config.{name}" not in errors:
            errors[f"config.{name}"] = ["Missing data for required field."]
    if errors:
        raise ValidationFailed("invalid config", fields=errors)
    return merged


def _new_ingest_key() -> str:
    return secrets.token_urlsafe(INGEST_KEY_BYTES)


# -- reading ---------------------------------------------------------------------------


def get_source(session: Session, user_id: uuid.UUID, source_id: uuid.UUID | str) -> DataSource:
    return get_owned(session, DataSource, user_id, source_id, what="data source")


def list_sources(
    user_id: uuid.UUID, *, source_type: str | None = None, status: str | None = None
) -> Select:
    """A select of the user's sources, optionally filtered; the caller paginates it."""
    stmt = select(DataSource).where(DataSource.user_id == user_id)
    if source_type is not None:
        stmt = stmt.where(DataSource.source_type == source_type)
    if status is not None:
        stmt = stmt.where(DataSource.status == status)
    return stmt


def view_of(box: SecretBox, source: DataSource) -> SourceView:
    """The source with every secret masked.

    A secret no configured key decrypts shows as the bare mask and is named in
    `unreadable_secrets`, so a list stays readable when one row is broken.
    """
    secret = secret_keys(source.source_type)
    config: dict[str, Any] = {}
    unreadable: list[str] = []
    for name, stored in source.config.items():
        if name not in secret:
            config[name] = stored
            continue
        token = _ciphertext(stored)
        try:
            if token is None:
                raise SecretUnreadable("not stored encrypted")
            config[name] = box.mask(box.decrypt(token))
        except SecretUnreadable:
            config[name] = MASK
            unreadable.append(name)
    return SourceView(
        id=source.id,
        name=source.name,
        source_type=source.source_type,
        status=source.status,
        config=config,
        unreadable_secrets=unreadable,
        ingest_key=source.ingest_key,
        last_sync_at=source.last_sync_at,
        created_at=source.created_at,
        updated_at=source.updated_at,
    )


def decrypted_config(box: SecretBox, source: DataSource) -> dict[str, Any]:
    """The config with its secrets in plaintext, for the sync workers that call vendors.

    Raises SecretUnreadable naming the fields when a secret cannot be decrypted.
    """
    secret = secret_keys(source.source_type)
    plain: dict[str, Any] = {}
    unreadable: list[str] = []
    for name, stored in source.config.items():
        if name not in secret:
            plain[name] = stored
            continue
        token = _ciphertext(stored)
        try:
            if token is None:
                raise SecretUnreadable("not stored encrypted")
            plain[name] = box.decrypt(token)
        except SecretUnreadable:
            unreadable.append(name)
    if unreadable:
        raise SecretUnreadable(
            "stored secrets cannot be decrypted with the configured ENCRYPTION_KEY; "
            "enter them again",
            fields={f"config.{name}": ["cannot be decrypted"] for name in unreadable},
        )
    return plain


# -- writing ---------------------------------------------------------------------------


def create_source(
    session: Session,
    box: SecretBox,
    user_id: uuid.UUID,
    *,
    name: str,
    source_type: str,
    config: dict[str, Any],
    status: str = "active",
) -> DataSource:
    source = DataSource(
        user_id=user_id,
        name=name,
        source_type=source_type,
        config=_merge_config(box, source_type, {}, config),
        status=status,
        ingest_key=_new_ingest_key() if source_type in INGEST_KEY_TYPES else None,
    )
    session.add(source)
    session.flush()
    return source


def update_source(
    session: Session,
    box: SecretBox,
    user_id: uuid.UUID,
    source_id: uuid.UUID | str,
    changes: dict[str, Any],
) -> DataSource:
    """Apply a PATCH. The row is locked so two concurrent config merges cannot lose
    each other's keys."""
    source = get_owned(session, DataSource, user_id, source_id, what="data source", for_update=True)
    new_type = changes.get("source_type", source.source_type)
    if new_type != source.source_type:
        raise ValidationFailed(
            "a source's type cannot change",
            fields={"source_type": ["cannot be changed; create a new source instead"]},
        )
    if "config" in changes:
        source.config = _merge_config(box, source.source_type, source.config, changes["config"])
    for field in ("name", "status"):
        if field in changes:
            setattr(source, field, changes[field])
    session.flush()
    return source


def delete_source(session: Session, user_id: uuid.UUID, source_id: uuid.UUID | str) -> None:
    """Delete the source; its events and contact links go with it (ON DELETE CASCADE)."""
    session.delete(get_source(session, user_id, source_id))
    session.flush()


def rotate_ingest_key(
    session: Session, user_id: uuid.UUID, source_id: uuid.UUID | str
) -> DataSource:
    """Replace the ingest key; the old one stops identifying the source at once."""
    source = get_owned(session, DataSource, user_id, source_id, what="data source", for_update=True)
    if source.source_type not in INGEST_KEY_TYPES:
        raise Conflict(
            f"a {source.source_type} source has no ingest key",
            code="no_ingest_key",
        )
    source.ingest_key = _new_ingest_key()
    session.flush()
    return source


# -- key rotation ----------------------------------------------------------------------


@dataclass(frozen=True)
class RotationBatch:
    sources_seen: int
    secrets_rotated: int
    secrets_current: int
    unreadable_sources: list[uuid.UUID]
    last_id: uuid.UUID | None


def rotate_secrets_batch(
    session: Session, box: SecretBox, *, after_id: uuid.UUID | None, limit: int = 500
) -> RotationBatch:
    """Re-encrypt under the first key the secrets of the next `limit` sources by id.

    The caller commits after each batch and passes `last_id` back, so a large table is
    rotated in short transactions. Rows are locked while their new config is computed so
    a concurrent PATCH is not overwritten with the config read before it. A secret
    already under the first key is left alone, so running the command twice writes nothing
    the second time.
    """
    stmt = (
        select(DataSource.id, DataSource.source_type, DataSource.config)
        .where(DataSource.source_type.in_(types_with_secrets()))
        .order_by(DataSource.id)
        .limit(limit)
        .with_for_update()
    )
    if after_id is not None:
        stmt = stmt.where(DataSource.id > after_id)
    rows = session.execute(stmt).all()
    new_configs: dict[uuid.UUID, dict[str, Any]] = {}
    rotated = current = 0
    unreadable: list[uuid.UUID] = []
    for row in rows:
        config = dict(row.config)
        changed = False
        for name in secret_keys(row.source_type) & config.keys():
            token = _ciphertext(config[name])
            if token is not None and box.is_current(token):
                current += 1
                continue
            try:
                config[name] = {CIPHERTEXT: box.rotate(token or "")}
            except SecretUnreadable:
                if row.id not in unreadable:
                    unreadable.append(row.id)
                continue
            rotated += 1
            changed = True
        if changed:
            new_configs[row.id] = config
    if new_configs:
        # One UPDATE for the whole batch (CASE on id), not one statement per row.
        config_type = DataSource.__table__.c.config.type
        session.execute(
            update(DataSource)
            .where(DataSource.id.in_(new_configs))
            .values(
                config=case(
                    *[
                        (DataSource.id == source_id, literal(config, config_type))
                        for source_id, config in new_configs.items()
                    ]
                )
            )
            .execution_options(synchronize_session=False)
        )
    return RotationBatch(
        sources_seen=len(rows),
        secrets_rotated=rotated,
        secrets_current=current,
        unreadable_sources=unreadable,
        last_id=rows[-1].id if rows else None,
    )
