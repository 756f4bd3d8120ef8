"""/u/<token>: the unsubscribe link every message carries. Public: the signed token is
the credential, and it names one delivery, so it can only unsubscribe that address.

GET only shows a confirmation form, because link scanners and mail previews fetch
links on their own; POST unsubscribes (RFC 8058 one-click, and the form's submit). The
form offers every channel the contact can be reached on, the message's own ticked; it
only ever adds suppressions (a forwarded link must not be able to re-subscribe anyone).
"""

from __future__ import annotations

from flask import Response, render_template, request
from flask_smorest import Blueprint

from api.extensions import db
from api.runtime import settings
from api.schemas.common import ErrorEnvelope
from api.schemas.deliveries import OneClickArgs
from engine.errors import NotFound
from engine.services import deliveries

blp = Blueprint("unsubscribe", __name__, description="Public unsubscribe links")

LINK = "/u/<token>"
CHANNEL_LABELS = {
    "email": "Email",
    "sms": "Text messages (SMS)",
    "whatsapp": "WhatsApp messages",
    "push": "Push notifications",
}
HTML = "text/html"
_HTML_DOC = {HTML: {"schema": {"type": "string"}}}


def _page(
    state: str,
    status: int = 200,
    channel: str | None = None,
    choices: list | None = None,
    done: list[str] | None = None,
):
    # A Response (not a tuple) so flask-smorest passes it through instead of as JSON.
    page = render_template(
        "unsubscribe.html",
        state=state,
        channel=channel,
        choices=choices or [],
        done=done or [],
        labels=CHANNEL_LABELS,
    )
    response = Response(page, status=status, mimetype=HTML)
    response.headers["Cache-Control"] = "no-store"
    return response


@blp.get(LINK)
@blp.doc(
    responses={
        "200": {"description": "a confirmation form that POSTs back", "content": _HTML_DOC},
    }
)
@blp.alt_response(
    404,
    schema=ErrorEnvelope,
    description="a forged or unknown link: this JSON error, or an HTML page when Accept "
    "prefers text/html (a browser)",
)
def confirm_page(token: str):
    """The confirmation page; nothing changes until its form is submitted."""
    try:
        target = deliveries.unsubscribe_target(db.session, settings(), token)
    except NotFound:
        # A person who clicked a mangled link gets a page; API clients (and anything
        # not asking for HTML first) get the usual JSON error.
        if request.accept_mimetypes.best_match(["application/json", HTML]) == HTML:
            return _page("unknown", 404)
        raise
    choices = deliveries.channel_choices(db.session, target)
    if not choices:
        return _page("nothing", channel=target.channel)
    own = next((c for c in choices if c.channel == target.channel), None)
    if own is None or own.unsubscribed:  # this message's channel: done; offer the rest
        return _page("done", channel=target.channel, choices=choices)
    return _page("confirm", channel=target.channel, choices=choices)


@blp.post(LINK)
@blp.arguments(OneClickArgs, location="form")
@blp.doc(
    responses={
        "200": {"description": "unsubscribed (repeating changes nothing)", "content": _HTML_DOC}
    }
)
@blp.alt_response(404, schema=ErrorEnvelope, description="a forged or unknown link")
def one_click(args: dict, token: str):
    """RFC 8058 one-click unsubscribe: body `List-Unsubscribe=One-Click` (form-encoded)
    or empty: suppresses this message's address on its channel for its sender. The
    confirmation page's form (`form=choices`, `channels=email&channels=sms`…) suppresses
    the contact's addresses on the ticked channels instead."""
    chosen = args["channels"] if args["form"] == "choices" else None
    target, done = deliveries.unsubscribe(db.session, settings(), token, chosen)
    if chosen is not None and not done:
        return _page("unchanged", channel=target.channel)
    return _page("done" if done else "nothing", channel=target.channel, done=done)
