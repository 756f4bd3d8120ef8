"""/api/v1/campaigns: campaigns, their status machine and their channels."""

from __future__ import annotations

from flask_smorest import Blueprint

blp = Blueprint("campaigns", __name__, url_prefix="/api/v1/campaigns", description="Campaigns")
