"""OpenAPI descriptions of the public tracking endpoints (/t/o, /t/c): they answer an
image and a redirect, not JSON, so their responses are documented by hand."""

from __future__ import annotations

from api.schemas.common import ErrorEnvelope

TOKEN_PARAMETER = {
    "in": "path",
    "name": "token",
    "required": True,
    "schema": {"type": "string"},
    "description": "the signed token Herald put into the message",
}

NO_STORE = {
    "Cache-Control": {
        "description": "no-store: every fetch reaches Herald",
        "schema": {"type": "string"},
    }
}

PIXEL_RESPONSES = {
    "200": {
        "description": "a 1x1 transparent GIF, whatever the token (a forged one records nothing)",
        "headers": NO_STORE,
        "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}},
    }
}

CLICK_RESPONSES = {
    "302": {
        "description": "to the link's destination (with the channel's UTM parameters)",
        "headers": {
            "Location": {"description": "the destination", "schema": {"type": "string"}},
            **NO_STORE,
        },
        "content": {"text/html": {"schema": {"type": "string"}}},
    },
    "404": {
        "description": "a forged or mangled token, or one whose message is gone: this JSON "
        "error, or a small HTML page when Accept prefers text/html (a browser)",
        "content": {
            "application/json": {"schema": ErrorEnvelope},
            "text/html": {"schema": {"type": "string"}},
        },
    },
}
