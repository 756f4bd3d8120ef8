"""/api/v1/contacts: contacts, bulk upsert and CSV imports."""

from __future__ import annotations

from flask_smorest import Blueprint

blp = Blueprint("contacts", __name__, url_prefix="/api/v1/contacts", description="Contacts")
