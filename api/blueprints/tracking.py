"""/t/o/<token> and /t/c/<token>: the open pixel and tracked links in every message.
Public: the signed token is the credential, and it names one delivery (and one link).

- The pixel always answers the 1x1 GIF, with a forged token too (nothing is recorded
  then): a tracking image must never show as broken in someone's mail, and answering
  forged and genuine tokens alike tells a prober nothing.
- A click answers 302 to the link's destination, read from the campaign's own links or
  from the token's signed destination, never from the request (no open redirect); a
  forged or mangled token, or one whose message is gone, answers 404.
- Both record an event, human or machine (engine.tracking.machine), exactly once where
  it counts (engine.tracking.hits). Nothing is cached (Cache-Control: no-store).
"""

from __future__ import annotations

import logging

from flask import Response, redirect, request
from flask_smorest import Blueprint
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.urls import iri_to_uri

from api.blueprints.webhooks import _in_transaction
from api.extensions import db
from api.input_guard import judges_text_itself
from api.runtime import clock, settings
from api.schemas.tracking import CLICK_RESPONSES, PIXEL_RESPONSES, TOKEN_PARAMETER
from engine.errors import NotFound
from engine.tracking import hits
from engine.tracking.machine import Hit
from engine.tracking.opens import PIXEL_GIF

log = logging.getLogger("herald.tracking")

blp = Blueprint(
    "tracking", __name__, url_prefix="/t", description="Open pixel and tracked links (public)"
)

NO_STORE = "no-store, no-cache, must-revalidate, max-age=0"
HTML = "text/html"
NOT_FOUND_PAGE = (
    "<!doctype html><html lang=en><meta charset=utf-8><title>Link not found</title>"
    "<h1>Link not found</h1><p>This link is incomplete or no longer valid. If you copied "
    "it, check that nothing was cut off.</p></html>"
)


def _session():
    """The request's session, in autocommit on PostgreSQL.

    Recording a hit is one statement there (engine.tracking.recording: the event, the
    compare-and-set and the counter in one CTE), atomic on its own, and a click's
    lookup before it is a plain read: a transaction around them adds two round trips
    (BEGIN, COMMIT) and nothing else, on the busiest public endpoints. SQLite records
    in several statements, so it keeps the request's transaction."""
    session = db.session
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return session


def _hit() -> Hit:
    return Hit(
        method=request.method,
        user_agent=request.headers.get("User-Agent", ""),
        ip=request.remote_addr,
    )


@blp.get("/o/<token>")
@judges_text_itself
@blp.doc(parameters=[TOKEN_PARAMETER], responses=PIXEL_RESPONSES)
def open_pixel(token: str):
    """The open pixel of an HTML email. A person's first fetch marks the delivery
    opened (and delivered); a privacy proxy's or a bot's is kept as a machine event."""
    try:
        _in_transaction(
            lambda: hits.record_open(_session(), settings(), token, _hit(), clock().now())
        )
    except SQLAlchemyError:
        # The reader still gets the image; the open is lost, and the log says so.
        log.exception("could not record an open")
        db.session.rollback()
    response = Response(PIXEL_GIF, mimetype="image/gif")
    response.headers["Cache-Control"] = NO_STORE
    response.headers["Pragma"] = "no-cache"
    response.headers["Expires"] = "0"
    return response


@blp.get("/c/<token>")
@judges_text_itself
@blp.doc(parameters=[TOKEN_PARAMETER], responses=CLICK_RESPONSES)
def click(token: str):
    """A tracked link: redirects to the campaign's link. A person's first click marks
    the delivery clicked (and opened, delivered); every click is kept as an event."""
    destination = _in_transaction(
        lambda: hits.record_click(_session(), settings(), token, _hit(), clock().now())
    )
    if destination is None:
        if request.accept_mimetypes.best_match(["application/json", HTML]) == HTML:
            page = Response(NOT_FOUND_PAGE, status=404, mimetype=HTML)
            page.headers["Cache-Control"] = NO_STORE
            return page
        raise NotFound("link not found")
    response = redirect(iri_to_uri(destination), 302)
    response.headers["Cache-Control"] = NO_STORE
    return response
