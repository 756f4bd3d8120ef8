"""/api/v1/conversations: conversations with the assistant (storage only for now)."""

from __future__ import annotations

from flask_smorest import Blueprint

blp = Blueprint(
    "conversations", __name__, url_prefix="/api/v1/conversations", description="Conversations"
)
