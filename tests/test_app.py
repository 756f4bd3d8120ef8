"""The app's edges: OpenAPI, probes, production guard rails, ops CLI."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.fernet import Fernet

from engine.settings import DEV_ENCRYPTION_KEY, ConfigError, Settings
from tests.helpers import assert_error, bearer, login, register, signed_up


def test_openapi_document_covers_auth_with_bearer_security(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path in (
        "/api/v1/auth/register",
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/auth/sessions/{session_id}",
    ):
        assert path in paths, sorted(paths)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert paths["/api/v1/auth/me"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in paths["/api/v1/auth/login"]["post"]
    register_schema = paths["/api/v1/auth/register"]["post"]["requestBody"]
    assert register_schema["required"] is True
    assert client.get("/api/v1/docs").status_code == 200


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readiness_fails_when_the_broker_is_unreachable(settings):
    from api import create_app

    app = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0"))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["database"] == "ok"
    assert ready.get_json()["checks"]["broker"].startswith("error")


def test_production_refuses_default_secrets(settings):
    from api import create_app

    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings(env="production").validated()
    strong = replace(
        settings,
        env="production",
        secret_key="s" * 40,
        jwt_secret_key="j" * 40,
        encryption_key=DEV_ENCRYPTION_KEY,
    )
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY"):
        strong.validated()
    real_key = Fernet.generate_key().decode()
    with pytest.raises(ConfigError, match="JWT_SECRET_KEY"):
        replace(strong, encryption_key=real_key, jwt_secret_key="short").validated()
    with pytest.raises(ConfigError, match="not a valid Fernet key"):
        replace(strong, encryption_key="k" * 44).validated()
    ok = replace(strong, encryption_key=f"{real_key},{DEV_ENCRYPTION_KEY}").validated()
    assert create_app(ok).config["SECRET_KEY"] == "s" * 40


def test_settings_reject_unknown_providers(monkeypatch):
    monkeypatch.setenv("SMS_PROVIDER", "carrier-pigeon")
    with pytest.raises(ConfigError, match="SMS_PROVIDER"):
        Settings.from_env()


def test_cli_creates_and_verifies_users(app, client):
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=[
            "users",
            "create",
            "--email",
            "Ops@Example.com",
            "--password",
            "ops-tested-passphrase",
        ]
    )
    assert created.exit_code == 0, created.output
    assert "ops@example.com" in created.output
    duplicate = runner.invoke(
        args=[
            "users",
            "create",
            "--email",
            "ops@example.com",
            "--password",
            "ops-tested-passphrase",
        ]
    )
    assert duplicate.exit_code != 0 and "already" in duplicate.output
    weak = runner.invoke(
        args=["users", "create", "--email", "w@example.com", "--password", "short"]
    )
    assert weak.exit_code != 0 and "password" in weak.output

    pair = login(client, "ops@example.com", "ops-tested-passphrase").get_json()
    assert (
        client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])).get_json()[
            "is_verified"
        ]
        is False
    )
    verified = runner.invoke(args=["users", "verify", "ops@example.com"])
    assert verified.exit_code == 0, verified.output
    assert (
        client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])).get_json()[
            "is_verified"
        ]
        is True
    )
    missing = runner.invoke(args=["users", "verify", "nobody@example.com"])
    assert missing.exit_code != 0
    listed = runner.invoke(args=["users", "list"])
    assert "ops@example.com" in listed.output and "verified" in listed.output
    purged = runner.invoke(args=["tokens", "purge"])
    assert purged.exit_code == 0 and "purged" in purged.output


def test_deleted_account_tokens_stop_working(client, db_session):
    from engine.models import User

    pair = signed_up(client)
    db_session.query(User).delete()
    db_session.commit()
    assert_error(
        client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])), 401, "token_revoked"
    )
    assert register(client).status_code == 201


def test_an_unexpected_failure_is_a_json_500_not_html(settings):
    from api import create_app

    broken = create_app(replace(settings, database_url="postgresql://postgres@127.0.0.1:1/nowhere"))
    response = broken.test_client().post(
        "/api/v1/auth/login", json={"email": "a@example.com", "password": "whatever-it-is"}
    )
    assert_error(response, 500, "internal_error")
    assert "<html" not in response.get_data(as_text=True).lower()


def test_registration_stands_when_the_broker_is_down(settings, db_session):
    """The account is committed before the email is queued; a broker outage must not
    turn that into a 500 (the client would retry and hit 409)."""
    from api import create_app
    from engine.models import User

    app = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0"))
    app.extensions["herald"].celery.conf.broker_connection_max_retries = 0
    app.extensions["herald"].celery.conf.broker_transport_options = {"max_retries": 0}
    response = register(app.test_client(), "offline@example.com")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert db_session.query(User).filter_by(email="offline@example.com").count() == 1


def test_text_postgresql_cannot_store_is_a_422_naming_the_field(client, alice):
    body = '{"title": "a\\u0000b", "extra": {"list": ["ok", "\\ud800"]}}'
    response = client.post(
        "/api/v1/conversations",
        data=body,
        content_type="application/json",
        headers=alice["headers"],
    )
    error = assert_error(response, 422, "validation_error", "title", "extra.list[1]")
    assert "NUL" in error["fields"]["title"][0] and "Unicode" in error["fields"]["extra.list[1]"][0]
    assert_error(
        client.get("/api/v1/contacts?email=a%00b", headers=alice["headers"]),
        422,
        "validation_error",
        "email",
    )
    fine = client.post("/api/v1/conversations", json={"title": "ça va ✓"}, headers=alice["headers"])
    assert fine.status_code == 201
