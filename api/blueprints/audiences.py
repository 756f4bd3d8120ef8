"""/api/v1/campaigns/{id}/audiences and recipient counts."""

from __future__ import annotations

from flask_smorest import Blueprint

blp = Blueprint(
    "audiences", __name__, url_prefix="/api/v1/campaigns", description="Campaign audiences"
)
