"""/api/v1/sources: data sources (GTM, Facebook pixel, Shopify).

Every response shows secrets masked; nothing here ever sees them in plaintext except on
the way in.
"""

from __future__ import annotations

import uuid

from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.extensions import db
from api.openapi import login_required
from api.runtime import settings
from api.schemas.sources import (
    SourceCreateArgs,
    SourceListArgs,
    SourceOut,
    SourcePage,
    SourceUpdateArgs,
)
from engine.crypto import SecretBox
from engine.models import DataSource
from engine.pagination import paginate
from engine.services import sources

blp = Blueprint("sources", __name__, url_prefix="/api/v1/sources", description="Data sources")


def _box() -> SecretBox:
    # Built per request (it is a few base64 decodes) rather than at startup, so an app
    # whose ENCRYPTION_KEY is bad still serves everything that does not touch secrets.
    return SecretBox(settings())


@blp.post("")
@login_required
@blp.arguments(SourceCreateArgs)
@blp.response(201, SourceOut)
def create_source(args: dict):
    """Create a source; gtm and facebook_pixel sources get an ingest key."""
    box = _box()
    source = sources.create_source(db.session, box, current_user.id, **args)
    return sources.view_of(box, source)


@blp.get("")
@login_required
@blp.arguments(SourceListArgs, location="query")
@blp.response(200, SourcePage)
def list_sources(args: dict):
    """The user's sources, newest first; filter by source_type and status."""
    page = paginate(
        db.session,
        sources.list_sources(
            current_user.id, source_type=args["source_type"], status=args["status"]
        ),
        DataSource,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    box = _box()
    return {
        "items": [sources.view_of(box, row) for row in page.items],
        "next_cursor": page.next_cursor,
    }


@blp.get("/<uuid:source_id>")
@login_required
@blp.response(200, SourceOut)
@blp.alt_response(404, response="NOT_FOUND")
def get_source(source_id: uuid.UUID):
    return sources.view_of(_box(), sources.get_source(db.session, current_user.id, source_id))


@blp.patch("/<uuid:source_id>")
@login_required
@blp.arguments(SourceUpdateArgs)
@blp.response(200, SourceOut)
@blp.alt_response(404, response="NOT_FOUND")
def update_source(args: dict, source_id: uuid.UUID):
    """Change name, status or config (merged key by key; see the config field)."""
    box = _box()
    source = sources.update_source(db.session, box, current_user.id, source_id, args)
    return sources.view_of(box, source)


@blp.delete("/<uuid:source_id>")
@login_required
@blp.response(204)
@blp.alt_response(404, response="NOT_FOUND")
def delete_source(source_id: uuid.UUID):
    """Delete the source with its events and contact links."""
    sources.delete_source(db.session, current_user.id, source_id)


@blp.post("/<uuid:source_id>/ingest-key/rotate")
@login_required
@blp.response(200, SourceOut)
@blp.alt_response(404, response="NOT_FOUND")
@blp.alt_response(409, response="CONFLICT", description="shopify sources have no ingest key")
def rotate_ingest_key(source_id: uuid.UUID):
    """Replace the ingest key; the old one stops working at once."""
    source = sources.rotate_ingest_key(db.session, current_user.id, source_id)
    return sources.view_of(_box(), source)
