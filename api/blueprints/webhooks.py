"""/webhooks/…: where providers report what became of each message. Public: each call
is proven by its signature (or, for push, the signed token it carries), checked on the
raw request before anything in it is parsed or stored.

- missing signature: 401 `signature_missing`; wrong one: 403 `signature_invalid`; the
  provider's secret not configured: 403 `webhook_not_configured`. Nothing is stored.
- a verified call always answers 2xx, even about messages Herald does not know
  (ignored): providers retry anything else for hours or days.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import TypeVar

from flask import Response, request
from flask_smorest import Blueprint
from sqlalchemy.exc import DBAPIError

from api.body_limits import body_limit
from api.errors import error_response
from api.extensions import db
from api.input_guard import judges_text_itself
from api.runtime import clock, settings
from api.schemas.common import ErrorEnvelope
from api.schemas.webhooks import (
    EMAIL_BODY,
    PUSH_BODY,
    TWILIO_INBOUND_BODY,
    TWILIO_STATUS_BODY,
    WHATSAPP_BODY,
    WebhookOut,
    header,
)
from engine.errors import AuthenticationFailed, Forbidden, ValidationFailed
from engine.tracking import email as email_events
from engine.tracking import twilio, webhooks
from engine.tracking.signatures import verify_sha256, verify_twilio
from engine.tracking.tokens import delivery_of_push_token

blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/webhooks",
    description="Provider webhooks: public, each call verified by its signature",
)

T = TypeVar("T")

# Twilio's forms are a few hundred bytes; Meta batches updates (up to ~3 MB documented);
# a DSN may return the whole original message, attachments included.
TWILIO_BODY_LIMIT = 64 * 1024
WHATSAPP_BODY_LIMIT = 4 * 1024 * 1024
EMAIL_BODY_LIMIT = 10 * 1024 * 1024
PUSH_BODY_LIMIT = 4 * 1024
# Meta sends an integer; anything echoed must at least be harmless as text/plain.
_CHALLENGE = re.compile(r"^[A-Za-z0-9._~-]{1,256}$")
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
# PostgreSQL's "deadlock detected" and "could not serialize": the transaction did
# nothing, so it can run again.
_RETRYABLE = frozenset({"40P01", "40001"})

_rejected = (
    blp.alt_response(401, schema=ErrorEnvelope, description="signature missing"),
    blp.alt_response(
        403,
        schema=ErrorEnvelope,
        description="signature_invalid, or webhook_not_configured (the secret is not set)",
    ),
)


def _signed(view):
    for decorate in _rejected:
        view = decorate(view)
    return view


def _in_transaction(work: Callable[[], T]) -> T:
    """Run the service; if PostgreSQL picked this transaction as a deadlock victim (a
    status callback for a row the sender is recording at that very moment), roll back
    and run it again rather than answer 500 and wait for the provider's retry."""
    for attempt in range(3):
        try:
            return work()
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            if code not in _RETRYABLE or attempt == 2:
                raise
            db.session.rollback()
    raise AssertionError("unreachable")


def _json_body(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


_NOT_JSON = object()


def _not_json():
    return error_response(400, "invalid_json", "request body is not valid JSON")


# -- Twilio -------------------------------------------------------------------------------


@blp.post("/twilio/status")
@body_limit(TWILIO_BODY_LIMIT)
@judges_text_itself
@blp.doc(
    requestBody=TWILIO_STATUS_BODY,
    parameters=[header("X-Twilio-Signature", "Twilio's signature of the call")],
)
@blp.response(200, WebhookOut)
@_signed
def twilio_status():
    """Twilio status callback (every SMS send names it as StatusCallback).

    Signed with X-Twilio-Signature over `{PUBLIC_BASE_URL}/webhooks/twilio/status`
    and the form. delivered counts as delivered; undelivered and failed mark the
    delivery failed (21211, 21614, 30005, 30006 suppress the number; 30003 counts as a
    soft bounce; 21610 means the recipient opted out); queued and sent change nothing."""
    config = settings()
    verify_twilio(
        config.twilio_auth_token,
        config.public_base_url + twilio.STATUS_PATH,
        request.form.items(multi=True),
        request.headers.get("X-Twilio-Signature"),
    )
    return _in_transaction(
        lambda: webhooks.twilio_status(db.session, config, request.form, clock().now())
    )


@blp.post("/twilio/inbound")
@body_limit(TWILIO_BODY_LIMIT)
@judges_text_itself
@blp.doc(
    requestBody=TWILIO_INBOUND_BODY,
    parameters=[header("X-Twilio-Signature", "Twilio's signature of the call")],
    responses={
        "200": {
            "description": "empty TwiML: no reply (Twilio answers STOP itself)",
            "content": {"text/xml": {"schema": {"type": "string"}}},
        }
    },
)
@_signed
def twilio_inbound():
    """Twilio inbound message webhook (set it on the number or messaging service).

    STOP, STOPALL, UNSUBSCRIBE, CANCEL, END or QUIT (any case, trimmed) suppress the
    sender's number on sms for every user who has it as a contact's phone; START or
    UNSTOP lift those unsubscribe suppressions. Other messages are ignored."""
    config = settings()
    verify_twilio(
        config.twilio_auth_token,
        config.public_base_url + twilio.INBOUND_PATH,
        request.form.items(multi=True),
        request.headers.get("X-Twilio-Signature"),
    )
    _in_transaction(lambda: webhooks.twilio_inbound(db.session, request.form))
    return Response(TWIML_EMPTY, mimetype="text/xml")


# -- WhatsApp -----------------------------------------------------------------------------


@blp.get("/whatsapp")
@judges_text_itself
@blp.doc(
    parameters=[
        {"in": "query", "name": "hub.mode", "schema": {"type": "string", "enum": ["subscribe"]}},
        {"in": "query", "name": "hub.verify_token", "schema": {"type": "string"}},
        {"in": "query", "name": "hub.challenge", "schema": {"type": "string"}},
    ],
    responses={
        "200": {
            "description": "hub.challenge, echoed",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
@blp.alt_response(
    403,
    schema=ErrorEnvelope,
    description="verify_token_invalid, or webhook_not_configured (WHATSAPP_VERIFY_TOKEN unset)",
)
@blp.alt_response(400, schema=ErrorEnvelope, description="hub.challenge missing or malformed")
def whatsapp_subscribe():
    """Meta's subscription check: hub.mode=subscribe and hub.verify_token equal to
    WHATSAPP_VERIFY_TOKEN answer hub.challenge as text/plain."""
    expected = settings().whatsapp_verify_token
    if not expected:
        raise Forbidden(
            "this webhook is disabled: WHATSAPP_VERIFY_TOKEN is not configured",
            code="webhook_not_configured",
        )
    given = request.args.get("hub.verify_token") or ""
    if request.args.get("hub.mode") != "subscribe" or not hmac.compare_digest(
        given.encode("utf-8", "replace"), expected.encode()
    ):
        raise Forbidden("hub.verify_token does not match", code="verify_token_invalid")
    challenge = request.args.get("hub.challenge") or ""
    if not _CHALLENGE.match(challenge):
        raise ValidationFailed(
            "request validation failed", fields={"hub.challenge": ["Missing or malformed."]}
        )
    response = Response(challenge, mimetype="text/plain")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@blp.post("/whatsapp")
@body_limit(WHATSAPP_BODY_LIMIT)
@judges_text_itself
@blp.doc(
    requestBody=WHATSAPP_BODY,
    parameters=[
        header("X-Hub-Signature-256", "sha256=<hex HMAC-SHA256 of the body, WHATSAPP_APP_SECRET>")
    ],
)
@blp.response(200, WebhookOut)
@_signed
@blp.alt_response(400, schema=ErrorEnvelope, description="invalid_json")
def whatsapp_updates():
    """WhatsApp Cloud API webhook: message statuses (sent; delivered; read, which
    counts as opened; failed, where 131026 suppresses the number and 131050 means the
    user stopped marketing messages) and inbound messages (STOP, or the marketing
    opt-out button, suppresses the number on whatsapp; START lifts it)."""
    config = settings()
    raw = request.get_data(cache=True)
    verify_sha256(
        config.whatsapp_app_secret,
        "WHATSAPP_APP_SECRET",
        raw,
        "X-Hub-Signature-256",
        request.headers.get("X-Hub-Signature-256"),
    )
    payload = _json_body(raw)
    if payload is _NOT_JSON:
        return _not_json()
    return _in_transaction(
        lambda: webhooks.whatsapp_updates(db.session, config, payload, clock().now())
    )


# -- email --------------------------------------------------------------------------------


@blp.post("/email")
@body_limit(EMAIL_BODY_LIMIT)
@judges_text_itself
@blp.doc(
    requestBody=EMAIL_BODY,
    parameters=[
        header("X-Herald-Signature", "sha256=<hex HMAC-SHA256 of the body, EMAIL_WEBHOOK_SECRET>")
    ],
)
@blp.response(200, WebhookOut)
@_signed
@blp.alt_response(400, schema=ErrorEnvelope, description="invalid_json")
@blp.alt_response(415, schema=ErrorEnvelope, description="not JSON nor a report message")
@blp.alt_response(422, schema=ErrorEnvelope, description="a JSON event is malformed")
def email_events_webhook():
    """Email events from the relay: delivered, bounce (hard or soft) and complaint as
    JSON, or a bounce (RFC 3464 DSN) or complaint (RFC 5965 ARF) posted raw as
    message/rfc822 or multipart/report. The message is found by the Message-ID Herald
    set. A hard bounce or complaint suppresses the address; soft bounces do after
    SOFT_BOUNCE_THRESHOLD in a row."""
    config = settings()
    raw = request.get_data(cache=True)
    verify_sha256(
        config.email_webhook_secret,
        "EMAIL_WEBHOOK_SECRET",
        raw,
        "X-Herald-Signature",
        request.headers.get("X-Herald-Signature"),
    )
    now = clock().now()
    mimetype = request.mimetype
    if mimetype == "application/json" or mimetype.endswith("+json"):
        payload = _json_body(raw)
        if payload is _NOT_JSON:
            return _not_json()
        reports = email_events.parse_json_events(payload, now)
        return _in_transaction(lambda: webhooks.email_reports(db.session, config, reports, now))
    if mimetype in ("message/rfc822", "multipart/report"):
        found, report_id = email_events.parse_report(raw, request.headers["Content-Type"])
        return _in_transaction(
            lambda: webhooks.email_reports(db.session, config, found, now, report_id=report_id)
        )
    return error_response(
        415,
        "unsupported_media_type",
        "send application/json events, or a report as message/rfc822 or multipart/report",
    )


# -- push ---------------------------------------------------------------------------------


@blp.post("/push")
@body_limit(PUSH_BODY_LIMIT)
@judges_text_itself
@blp.doc(requestBody=PUSH_BODY)
@blp.response(200, WebhookOut)
@blp.alt_response(401, schema=ErrorEnvelope, description="token missing")
@blp.alt_response(403, schema=ErrorEnvelope, description="token forged or mangled")
def push_delivered():
    """The app reports a push reached the device by posting the token it found in the
    push's `data.herald_token` (to the URL in `data.herald_delivered_url`). The token
    is the only proof; it marks that one delivery delivered, once."""
    payload = request.get_json(silent=True)
    token = payload.get("token") if isinstance(payload, dict) else None
    if not isinstance(token, str) or not token:
        raise AuthenticationFailed("token missing", code="token_missing")
    config = settings()
    if delivery_of_push_token(config, token) is None:
        raise Forbidden("token is not one Herald issued", code="token_invalid")
    return _in_transaction(
        lambda: webhooks.push_delivered(db.session, config, token, clock().now())
    )
