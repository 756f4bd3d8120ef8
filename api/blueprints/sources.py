"""/api/v1/sources: data sources (GTM, Facebook pixel, Shopify)."""

from __future__ import annotations

from flask_smorest import Blueprint

blp = Blueprint("sources", __name__, url_prefix="/api/v1/sources", description="Data sources")
