"""One error shape for every failure: {"error": {"code", "message", "fields"}}.

`fields` maps the path of each bad input to its messages ("definition.all[2].op"),
flattened from marshmallow's nested dicts, so a client can point at the exact field.
No handler here ever answers HTML, and nothing escapes as a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, InternalServerError

from engine.errors import (
    AuthenticationFailed,
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    RateLimited,
    ValidationFailed,
)

log = logging.getLogger("herald.api")

STATUS_OF = {
    ValidationFailed: 422,
    NotFound: 404,
    Conflict: 409,
    AuthenticationFailed: 401,
    Forbidden: 403,
    RateLimited: 429,
}

CODE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def error_response(
    status: int,
    code: str,
    message: str,
    fields: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
):
    body = {"error": {"code": code, "message": message, "fields": fields or {}, **extra}}
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """{"json": {"items": {"2": {"op": ["bad"]}}}} -> {"items[2].op": ["bad"]}."""
    flat: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            key = str(key)
            if key.isdigit():
                path = f"{prefix}[{key}]"
            elif key == "_schema":
                path = prefix or "body"
            else:
                path = f"{prefix}.{key}" if prefix else key
            flat.update(flatten_messages(value, path))
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        flat.setdefault(prefix or "body", []).extend(messages)
    elif isinstance(messages, list):
        for index, value in enumerate(messages):
            flat.update(flatten_messages(value, f"{prefix}[{index}]"))
    else:
        flat.setdefault(prefix or "body", []).append(str(messages))
    return flat


def _strip_location(messages: Any) -> Any:
    """webargs nests errors under the request location ("json", "query"); drop it."""
    if isinstance(messages, dict) and set(messages) <= {"json", "query", "form", "files"}:
        merged: dict[str, Any] = {}
        for value in messages.values():
            if isinstance(value, dict):
                merged.update(value)
            else:
                merged.setdefault("_schema", value)
        return merged
    return messages


def handle_http_exception(error: HTTPException):
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    headers = dict(data.get("headers") or {})
    if status >= 500:
        return error_response(500, "internal_error", "internal server error")
    messages = data.get("messages") or data.get("errors")
    if status == 400 and messages and "json" in messages:
        return error_response(
            400, "invalid_json", "request body is not valid JSON", headers=headers
        )
    fields = flatten_messages(_strip_location(messages)) if messages else {}
    message = data.get("message") or (
        "request validation failed" if status == 422 else (error.description or error.name)
    )
    return error_response(
        status, CODE_OF_STATUS.get(status, "error"), message, fields, headers=headers
    )


def handle_domain_error(error: DomainError):
    status = next((s for cls, s in STATUS_OF.items() if isinstance(error, cls)), 400)
    headers = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after)
    extra = {k: v for k, v in error.extra.items() if k != "retry_after"}
    return error_response(status, error.code, error.message, error.fields, headers, **extra)


def handle_unexpected(error: Exception):
    log.exception("unhandled error", exc_info=error)
    return handle_http_exception(InternalServerError())


def handle_too_deeply_nested(_error: RecursionError):
    # json.loads recurses per nesting level: "[[[[…" a hundred thousand deep blows the
    # stack while parsing. That is a malformed body, not a server fault.
    return error_response(400, "invalid_json", "request body is nested too deeply")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(DomainError, handle_domain_error)
    app.register_error_handler(RecursionError, handle_too_deeply_nested)
    app.register_error_handler(Exception, handle_unexpected)
