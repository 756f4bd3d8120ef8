"""Liveness and readiness probes, outside /api/v1 and without auth."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from api.extensions import db
from api.runtime import celery_app

blp = Blueprint("health", __name__)


@blp.get("/healthz")
def healthz():
    """The process is up; says nothing about its dependencies."""
    return jsonify({"status": "ok"})


@blp.get("/readyz")
def readyz():
    """Ready to serve: the database answers a query and the broker accepts a connection."""
    checks: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with celery_app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response
