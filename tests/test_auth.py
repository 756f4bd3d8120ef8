"""Every auth path through the real app, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from engine.models import TokenBlacklist, User, UserSession
from tests.helpers import (
    PASSWORD,
    assert_error,
    bearer,
    login,
    register,
    signed_up,
    token_in,
)


def test_register_returns_user_without_secrets_and_normalizes_email(client, db_session):
    response = register(client, "  Ada@Example.COM ", company_name="Analytical Engines")
    assert response.status_code == 201
    body = response.get_json()
    assert body["email"] == "ada@example.com"
    assert body["is_verified"] is False
    assert "password" not in body and "password_hash" not in body
    assert "$argon2id$" not in response.get_data(as_text=True)
    created = datetime.fromisoformat(body["created_at"])
    assert created.utcoffset() == timedelta(0)
    stored = db_session.scalar(select(User).where(User.email == "ada@example.com"))
    assert stored.password_hash.startswith("$argon2id$")


def test_duplicate_email_in_any_case_is_409(client):
    assert register(client, "ada@example.com").status_code == 201
    assert_error(register(client, "ADA@example.com"), 409, "email_taken", "email")


@pytest.mark.parametrize(
    ("password", "problem"),
    [("short-pw", "at least 10"), ("qwertyuiop", "too common"), ("1234567890", "too common")],
)
def test_weak_passwords_are_rejected_naming_the_field(client, password, problem):
    error = assert_error(register(client, password=password), 422, "validation_error", "password")
    assert any(problem in m for m in error["fields"]["password"])


def test_missing_fields_malformed_json_unknown_fields_and_oversized_body(client):
    error = assert_error(
        client.post("/api/v1/auth/register", json={}), 422, "validation_error", "email", "password"
    )
    assert error["fields"]["email"]
    assert_error(
        client.post("/api/v1/auth/register", data='{"email": ', content_type="application/json"),
        400,
        "invalid_json",
    )
    assert_error(register(client, shoe_size=44), 422, "validation_error", "shoe_size")
    assert_error(
        client.post("/api/v1/auth/register", json={"email": "not-an-email", "password": PASSWORD}),
        422,
        "validation_error",
        "email",
    )
    huge = {"email": "a@example.com", "password": PASSWORD, "first_name": "x" * (1024 * 1024)}
    assert_error(client.post("/api/v1/auth/register", json=huge), 413, "payload_too_large")
    assert_error(client.post("/api/v1/auth/register", json=[1, 2]), 422, "validation_error")


def test_unknown_route_and_method_answer_json(client):
    assert_error(client.get("/api/v1/nope"), 404, "not_found")
    assert_error(client.get("/api/v1/auth/login"), 405, "method_not_allowed")


def test_verification_email_travels_through_a_worker_and_smtp(client, smtp_sink, celery_worker):
    pair = signed_up(client, "grace@example.com")
    message = smtp_sink.wait_for("grace@example.com")[-1]
    assert "Verify" in message["Subject"]
    token = token_in(message, "verification token")

    assert_error(
        client.post("/api/v1/auth/verify", json={"token": token + "x"}),
        422,
        "validation_error",
        "token",
    )
    response = client.post("/api/v1/auth/verify", json={"token": token})
    assert response.status_code == 200
    assert response.get_json()["is_verified"] is True
    me = client.get("/api/v1/auth/me", headers=bearer(pair["access_token"]))
    assert me.get_json()["is_verified"] is True
    assert_error(
        client.post("/api/v1/auth/verify/resend", headers=bearer(pair["access_token"])),
        409,
        "already_verified",
    )


def test_login_writes_a_session_with_hashed_refresh_token(client, db_session):
    register(client)
    response = login(client, headers={"User-Agent": "pytest-agent/1.0"})
    assert response.status_code == 200
    pair = response.get_json()
    assert pair["token_type"] == "Bearer"
    assert pair["expires_in"] == 900
    row = db_session.scalar(select(UserSession))
    assert row.refresh_token_hash == hashlib.sha256(pair["refresh_token"].encode()).hexdigest()
    assert pair["refresh_token"] not in row.refresh_token_hash
    assert row.user_agent == "pytest-agent/1.0"
    assert str(row.ip_address) == "127.0.0.1"
    assert row.expires_at > datetime.now(UTC) + timedelta(days=29)
    user = db_session.scalar(select(User))
    assert user.last_login_at is not None
    me = client.get("/api/v1/auth/me", headers=bearer(pair["access_token"]))
    assert me.status_code == 200 and me.get_json()["email"] == "ada@example.com"


def test_unknown_email_and_wrong_password_look_the_same(client):
    register(client)
    wrong = login(client, password="not-the-password-at-all")
    unknown = login(client, email="nobody@example.com")
    assert_error(wrong, 401, "invalid_credentials")
    assert wrong.get_json() == unknown.get_json()


def test_login_failures_are_rate_limited_per_account(client):
    register(client)
    for _ in range(3):
        assert login(client, password="wrong-password-123").status_code == 401
    blocked = login(client)  # even the right password waits out the window
    assert_error(blocked, 429, "rate_limited")
    assert 1 <= int(blocked.headers["Retry-After"]) <= 900
    # Another account from another address is unaffected.
    register(client, "bob@example.com")
    other = login(client, "bob@example.com", environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 200


def test_login_failures_are_rate_limited_per_ip(client):
    register(client, "target@example.com")
    for i in range(6):
        assert login(client, f"guess{i}@example.com").status_code == 401
    assert_error(login(client, "target@example.com"), 429, "rate_limited")
    from_elsewhere = login(client, "target@example.com", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert from_elsewhere.status_code == 200


def test_successful_login_clears_the_account_failures(client):
    register(client)
    for _ in range(2):
        login(client, password="wrong-password-123")
    assert login(client).status_code == 200
    for _ in range(2):
        login(client, password="wrong-password-123")
    assert login(client).status_code == 200


def _refresh(client, refresh_token):
    return client.post("/api/v1/auth/refresh", headers=bearer(refresh_token))


def test_refresh_rotates_and_reuse_revokes_every_session(client):
    first = signed_up(client)
    other_device = login(client).get_json()

    rotated = _refresh(client, first["refresh_token"])
    assert rotated.status_code == 200
    second = rotated.get_json()
    assert second["refresh_token"] != first["refresh_token"]
    assert client.get("/api/v1/auth/me", headers=bearer(second["access_token"])).status_code == 200

    # The old refresh token comes back: theft. Everything of this user is signed out.
    assert_error(_refresh(client, first["refresh_token"]), 401, "token_reused")
    assert_error(_refresh(client, second["refresh_token"]), 401, "token_reused")
    assert_error(
        client.get("/api/v1/auth/me", headers=bearer(second["access_token"])), 401, "token_revoked"
    )
    assert_error(
        client.get("/api/v1/auth/me", headers=bearer(other_device["access_token"])),
        401,
        "token_revoked",
    )
    assert_error(_refresh(client, other_device["refresh_token"]), 401, "token_reused")
    assert login(client).status_code == 200  # the password still works


def test_access_and_refresh_tokens_are_not_interchangeable(client):
    pair = signed_up(client)
    assert client.get("/api/v1/auth/me", headers=bearer(pair["refresh_token"])).status_code == 401
    assert _refresh(client, pair["access_token"]).status_code == 401
    assert_error(client.get("/api/v1/auth/me"), 401, "unauthorized")
    assert_error(client.get("/api/v1/auth/me", headers=bearer("garbage")), 401, "invalid_token")


def test_logout_blacklists_access_and_revokes_refresh(client, db_session):
    pair = signed_up(client)
    assert (
        client.post("/api/v1/auth/logout", headers=bearer(pair["access_token"])).status_code == 204
    )
    row = db_session.scalar(select(TokenBlacklist))
    assert row is not None and row.token_type == "access"
    assert_error(
        client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])), 401, "token_revoked"
    )
    assert_error(_refresh(client, pair["refresh_token"]), 401, "token_reused")


def test_tokens_expire(client):
    start = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    with freeze_time(start) as frozen:
        pair = signed_up(client)
        frozen.move_to(start + timedelta(seconds=899))
        assert (
            client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])).status_code == 200
        )
        frozen.move_to(start + timedelta(seconds=901))
        assert_error(
            client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])),
            401,
            "token_expired",
        )
        refreshed = _refresh(client, pair["refresh_token"])
        assert refreshed.status_code == 200
        frozen.move_to(start + timedelta(days=31))
        assert_error(_refresh(client, refreshed.get_json()["refresh_token"]), 401, "token_expired")


def test_password_change_keeps_this_session_and_revokes_others(client):
    mine = signed_up(client)
    other = login(client).get_json()
    new_password = "a-brand-new-secret-phrase"
    wrong = client.post(
        "/api/v1/auth/password",
        headers=bearer(mine["access_token"]),
        json={"current_password": "nope-nope-nope", "new_password": new_password},
    )
    assert_error(wrong, 422, "validation_error", "current_password")
    changed = client.post(
        "/api/v1/auth/password",
        headers=bearer(mine["access_token"]),
        json={"current_password": PASSWORD, "new_password": new_password},
    )
    assert changed.status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(mine["access_token"])).status_code == 200
    assert client.get("/api/v1/auth/me", headers=bearer(other["access_token"])).status_code == 401
    assert login(client).status_code == 401
    assert login(client, password=new_password).status_code == 200


def test_password_reset_by_emailed_token_works_once(client, smtp_sink, celery_worker):
    pair = signed_up(client, "linus@example.com")
    accepted = client.post(
        "/api/v1/auth/password/reset-request", json={"email": "linus@example.com"}
    )
    unknown = client.post(
        "/api/v1/auth/password/reset-request", json={"email": "ghost@example.com"}
    )
    assert accepted.status_code == unknown.status_code == 202
    assert accepted.get_json() == unknown.get_json()
    message = next(
        m for m in smtp_sink.wait_for("linus@example.com", count=2) if "Reset" in m["Subject"]
    )
    token = token_in(message, "reset token")
    new_password = "quiet-meadow-under-snow"
    body = {"token": token, "new_password": new_password}
    assert client.post("/api/v1/auth/password/reset", json=body).status_code == 200
    assert_error(
        client.post("/api/v1/auth/password/reset", json=body), 422, "validation_error", "token"
    )
    assert client.get("/api/v1/auth/me", headers=bearer(pair["access_token"])).status_code == 401
    assert login(client, "linus@example.com", password=new_password).status_code == 200


def test_sessions_list_paginates_and_revoke_is_tenant_isolated(client):
    ada_first = signed_up(client, "ada@example.com")
    ada_second = login(client, "ada@example.com").get_json()
    bob = signed_up(client, "bob@example.com")

    page = client.get("/api/v1/auth/sessions?limit=1", headers=bearer(ada_second["access_token"]))
    assert page.status_code == 200
    first_page = page.get_json()
    assert len(first_page["items"]) == 1 and first_page["next_cursor"]
    assert first_page["items"][0]["current"] is True
    rest = client.get(
        f"/api/v1/auth/sessions?limit=1&cursor={first_page['next_cursor']}",
        headers=bearer(ada_second["access_token"]),
    ).get_json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    older_id = rest["items"][0]["id"]
    assert older_id != first_page["items"][0]["id"]

    # Bob cannot see or touch Ada's session: 404, exactly like a missing one.
    assert_error(
        client.delete(f"/api/v1/auth/sessions/{older_id}", headers=bearer(bob["access_token"])),
        404,
        "not_found",
    )
    assert_error(
        client.delete(f"/api/v1/auth/sessions/{uuid.uuid4()}", headers=bearer(bob["access_token"])),
        404,
        "not_found",
    )
    assert (
        client.get("/api/v1/auth/me", headers=bearer(ada_first["access_token"])).status_code == 200
    )

    revoked = client.delete(
        f"/api/v1/auth/sessions/{older_id}", headers=bearer(ada_second["access_token"])
    )
    assert revoked.status_code == 204
    assert (
        client.get("/api/v1/auth/me", headers=bearer(ada_first["access_token"])).status_code == 401
    )
    assert (
        client.get("/api/v1/auth/me", headers=bearer(ada_second["access_token"])).status_code == 200
    )
    assert_error(
        client.get("/api/v1/auth/sessions?cursor=%%%", headers=bearer(bob["access_token"])),
        422,
        "validation_error",
        "cursor",
    )


def test_purge_drops_only_expired_rows(app, db_session):
    from engine.services.auth import purge_expired_tokens

    now = datetime.now(UTC)
    user = User(email="p@example.com", password_hash="x")
    db_session.add(user)
    db_session.flush()
    for delta in (-1, 1):
        db_session.add(
            TokenBlacklist(
                jti=f"j{delta}", user_id=user.id, expires_at=now + timedelta(hours=delta)
            )
        )
        db_session.add(
            UserSession(
                user_id=user.id,
                refresh_token_hash=f"h{delta}",
                expires_at=now + timedelta(hours=delta),
            )
        )
    db_session.commit()
    assert purge_expired_tokens(db_session, now) == {"blacklist": 1, "sessions": 1}
    db_session.commit()
    assert [r.jti for r in db_session.scalars(select(TokenBlacklist))] == ["j1"]


def test_racing_refreshes_with_one_token_have_exactly_one_winner(app):
    import threading

    client = app.test_client()
    pair = signed_up(client)
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def refresh_once():
        barrier.wait()
        statuses.append(_refresh(app.test_client(), pair["refresh_token"]).status_code)

    threads = [threading.Thread(target=refresh_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 401, 401, 401]


def test_a_body_nested_too_deeply_is_a_400(client):
    body = "[" * 100_000 + "]" * 100_000
    response = client.post("/api/v1/auth/login", data=body, content_type="application/json")
    assert_error(response, 400, "invalid_json")
