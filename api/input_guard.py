"""Refuse text PostgreSQL cannot store before any view sees it.

A NUL character or a lone UTF-16 surrogate (JSON allows "\\u0000" and "\\ud800") is valid
input to Python but makes PostgreSQL reject the statement, which would surface as a
500 deep inside whatever service touched it. One check here, over every JSON body and
query string, turns that into a 422 naming the field, for every route at once.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, request

from api.errors import error_response

PROBLEM = "contains a NUL character or invalid Unicode (a lone surrogate), which cannot be stored"


def _unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unstorable_paths(value: Any, path: str = "") -> list[str]:
    if isinstance(value, str):
        return [path or "body"] if _unstorable(value) else []
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _unstorable(key):
                found.append(child)
            found.extend(unstorable_paths(item, child))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(unstorable_paths(item, f"{path}[{index}]"))
    return found


def judges_text_itself(view):
    """Mark a view whose service rejects unstorable text itself, at a finer grain (the
    bulk upsert rejects the one bad row, not the whole batch)."""
    view.judges_text_itself = True
    return view


def _check_request():
    view = current_app.view_functions.get(request.endpoint or "")
    if getattr(view, "judges_text_itself", False):
        return None
    bad = [key for key, values in request.args.lists() if any(map(_unstorable, [key, *values]))]
    if request.is_json and request.content_length:
        body = request.get_json(silent=True)  # cached; malformed JSON is the parser's 400
        bad.extend(unstorable_paths(body))
    if bad:
        return error_response(
            422, "validation_error", "request validation failed", {p: [PROBLEM] for p in bad}
        )
    return None


def init_input_guard(app: Flask) -> None:
    app.before_request(_check_request)
