"""Properties every route of the API keeps, checked over the whole URL map so a new
route cannot forget them: it needs a token, an unknown id is a JSON 404, and it is in
the OpenAPI document."""

from __future__ import annotations

import re
import uuid

import pytest

PUBLIC = {
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/verify"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/password/reset-request"),
    ("POST", "/api/v1/auth/password/reset"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/docs"),
    ("GET", "/api/v1/docs/"),
}


def api_routes(app):
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.endpoint.startswith("api-docs"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, rule


def concrete(rule, value: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?[^>]+>", value, rule.rule)


def test_every_api_route_needs_a_token(app, client):
    checked = 0
    for method, rule in api_routes(app):
        if (method, rule.rule) in PUBLIC:
            continue
        response = client.open(concrete(rule, str(uuid.uuid4())), method=method, json={})
        assert response.status_code == 401, (method, rule.rule, response.get_data(as_text=True))
        assert response.get_json()["error"]["code"] == "unauthorized"
        checked += 1
    assert checked >= 5


def test_unknown_ids_answer_json_404(app, client, alice):
    checked = 0
    for method, rule in api_routes(app):
        if "<" not in rule.rule or method not in {"GET", "DELETE"}:
            continue
        url = concrete(rule, str(uuid.uuid4()))
        response = client.open(url, method=method, headers=alice["headers"])
        assert response.status_code == 404, (method, url, response.get_data(as_text=True))
        assert response.get_json()["error"]["code"] == "not_found"
        checked += 1
    assert checked >= 1


def test_every_api_route_is_documented(app, client):
    spec = client.get("/api/v1/openapi.json").get_json()
    documented = {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method != "parameters"
    }
    missing = [
        (method, rule.rule)
        for method, rule in api_routes(app)
        if (method, re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)) not in documented
        and not rule.rule.startswith(("/api/v1/docs", "/api/v1/openapi.json"))
    ]
    assert len(documented) >= 10
    assert missing == []


@pytest.mark.parametrize("path", ["/api/v1/nothing-here", "/api/v1/auth/nope"])
def test_unknown_paths_are_json_404(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
