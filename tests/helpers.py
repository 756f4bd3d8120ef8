"""Small request helpers shared by API tests."""

from __future__ import annotations

import re

PASSWORD = "violet-harbour-42-lantern"


def register(client, email: str = "ada@example.com", password: str = PASSWORD, **extra):
    body = {"email": email, "password": password, "first_name": "Ada", **extra}
    return client.post("/api/v1/auth/register", json=body)


def login(client, email: str = "ada@example.com", password: str = PASSWORD, **kwargs):
    return client.post("/api/v1/auth/login", json={"email": email, "password": password}, **kwargs)


def signed_up(client, email: str = "ada@example.com") -> dict:
    """Register and log in; returns the token pair."""
    assert register(client, email).status_code == 201
    response = login(client, email)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_in(message, label: str) -> str:
    """Pull `<label>: <token>` out of a system email body."""
    body = message.get_payload(decode=True).decode()
    match = re.search(rf"{label}: (\S+)", body)
    assert match, body
    return match.group(1)


def assert_error(response, status: int, code: str, *fields: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    for field in fields:
        assert field in error["fields"], error
    return error
