"""Per-route request body limits: 1 MB unless a route says otherwise.

Flask 3.1 lets each request carry its own max_content_length, so a bulk route can
accept 20 MB while everything else stays small; werkzeug answers 413 past it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flask import Flask, current_app, request

DEFAULT_BODY_LIMIT = 1024 * 1024

F = TypeVar("F", bound=Callable)


def body_limit(max_bytes: int) -> Callable[[F], F]:
    def mark(view: F) -> F:
        view.body_limit = max_bytes  # type: ignore[attr-defined]
        return view

    return mark


def _apply_route_limit() -> None:
    view = current_app.view_functions.get(request.endpoint or "")
    limit = getattr(view, "body_limit", None)
    if limit is not None:
        request.max_content_length = limit


def init_body_limits(app: Flask) -> None:
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = DEFAULT_BODY_LIMIT
    app.before_request(_apply_route_limit)
