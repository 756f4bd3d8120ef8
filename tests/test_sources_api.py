"""/api/v1/sources through the real app and PostgreSQL: validation per type, ingest keys,
secrets encrypted at rest and masked on the way out, key rotation, tenant isolation."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select, text

from engine.crypto import SecretBox, SecretUnreadable
from engine.models import DataEvent, DataSource
from engine.services.sources import decrypted_config
from tests.helpers import assert_error

URL = "/api/v1/sources"
ACCESS_TOKEN = "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"
WEBHOOK_SECRET = "whsec9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a"
PIXEL_TOKEN = "EAAGm0PX4ZCpsBAKZBQZDZDpixeltoken7f3e"


def shopify_body(**config) -> dict:
    return {
        "name": "My shop",
        "source_type": "shopify",
        "config": {
            "shop_domain": "herald-demo.myshopify.com",
            "access_token": ACCESS_TOKEN,
            "api_version": "2024-10",
            "webhook_secret": WEBHOOK_SECRET,
            **config,
        },
    }


GTM = {"name": "Site tags", "source_type": "gtm", "config": {"container_id": "GTM-AB12CD3"}}
PIXEL = {
    "name": "Pixel",
    "source_type": "facebook_pixel",
    "config": {"pixel_id": "123456789012345", "access_token": PIXEL_TOKEN},
}


def create(client, account, body) -> dict:
    response = client.post(URL, json=body, headers=account["headers"])
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def raw_configs(db_session) -> list[str]:
    return list(db_session.scalars(text("SELECT config::text FROM data_sources")))


def stored_config(db_session, source_id) -> dict:
    raw = db_session.scalar(
        text("SELECT config::text FROM data_sources WHERE id = :id"), {"id": source_id}
    )
    return json.loads(raw)


def app_with_keys(settings, keys: str):
    from api import create_app

    return create_app(replace(settings, encryption_key=keys))


# -- create, read, ingest keys ---------------------------------------------------------


def test_create_each_type_and_read_it_back(client, alice):
    shop = create(client, alice, shopify_body(shop_domain="  Herald-Demo.MyShopify.com "))
    assert shop["source_type"] == "shopify" and shop["status"] == "active"
    assert shop["config"] == {
        "shop_domain": "herald-demo.myshopify.com",
        "access_token": "shpat_****1100",
        "api_version": "2024-10",
        "webhook_secret": "****2f1a",
    }
    assert shop["unreadable_secrets"] == []
    assert shop["ingest_key"] is None and shop["last_sync_at"] is None
    assert datetime.fromisoformat(shop["created_at"]).utcoffset().total_seconds() == 0

    gtm = create(client, alice, {**GTM, "config": {"container_id": "gtm-ab12cd3"}})
    assert gtm["config"] == {"container_id": "GTM-AB12CD3"}
    pixel = create(client, alice, {**PIXEL, "status": "paused"})
    assert pixel["status"] == "paused"
    assert pixel["config"] == {"pixel_id": "123456789012345", "access_token": "****7f3e"}

    for created in (shop, gtm, pixel):
        fetched = client.get(f"{URL}/{created['id']}", headers=alice["headers"])
        assert fetched.status_code == 200 and fetched.get_json() == created


def test_ingest_keys_for_gtm_and_pixel_only_unique_and_rotatable(client, alice, db_session):
    gtm = create(client, alice, GTM)
    pixel = create(client, alice, PIXEL)
    shop = create(client, alice, shopify_body())
    keys = [gtm["ingest_key"], pixel["ingest_key"]]
    for key in keys:
        assert isinstance(key, str) and 32 <= len(key) <= 64
        assert key.replace("-", "").replace("_", "").isalnum()
    assert len(set(keys)) == 2
    assert shop["ingest_key"] is None
    stored = dict(db_session.execute(select(DataSource.id, DataSource.ingest_key)).all())
    assert stored[uuid.UUID(gtm["id"])] == gtm["ingest_key"]
    assert stored[uuid.UUID(shop["id"])] is None

    rotated = client.post(f"{URL}/{gtm['id']}/ingest-key/rotate", headers=alice["headers"])
    assert rotated.status_code == 200
    new_key = rotated.get_json()["ingest_key"]
    assert new_key not in keys and len(new_key) <= 64
    assert (
        db_session.scalar(
            select(DataSource.ingest_key).where(DataSource.id == uuid.UUID(gtm["id"]))
        )
        == new_key
    )
    assert_error(
        client.post(f"{URL}/{shop['id']}/ingest-key/rotate", headers=alice["headers"]),
        409,
        "no_ingest_key",
    )


# -- secrets at rest ---------------------------------------------------------------------


def test_secrets_are_encrypted_at_rest_and_never_answered_in_full(client, alice, db_session):
    responses = []
    shop_response = client.post(URL, json=shopify_body(), headers=alice["headers"])
    responses.append(shop_response)
    shop = shop_response.get_json()
    responses.append(client.post(URL, json=PIXEL, headers=alice["headers"]))
    responses.append(client.get(URL, headers=alice["headers"]))
    responses.append(client.get(f"{URL}/{shop['id']}", headers=alice["headers"]))
    responses.append(
        client.patch(f"{URL}/{shop['id']}", json={"name": "Renamed"}, headers=alice["headers"])
    )
    secrets = (ACCESS_TOKEN, WEBHOOK_SECRET, PIXEL_TOKEN)

    raw_rows = raw_configs(db_session)
    assert len(raw_rows) == 2
    for raw in raw_rows:
        for secret in secrets:
            assert secret not in raw
            assert secret[-12:] not in raw  # not even a recognisable tail
    for response in responses:
        assert response.status_code in (200, 201)
        body = response.get_data(as_text=True)
        for secret in secrets:
            assert secret not in body

    # What is stored is the secret itself, encrypted under ENCRYPTION_KEY.
    stored = stored_config(db_session, shop["id"])
    assert set(stored) == {"shop_domain", "access_token", "api_version", "webhook_secret"}
    assert stored["shop_domain"] == "herald-demo.myshopify.com"
    fernet = Fernet(client.application.extensions["herald"].settings.encryption_key.encode())
    assert fernet.decrypt(stored["access_token"]["ciphertext"].encode()).decode() == ACCESS_TOKEN
    assert (
        fernet.decrypt(stored["webhook_secret"]["ciphertext"].encode()).decode() == WEBHOOK_SECRET
    )


def test_decrypted_config_gives_the_sync_engine_plaintext(client, alice, db_session, settings):
    shop = create(client, alice, shopify_body())
    gtm = create(client, alice, GTM)
    source = db_session.get(DataSource, uuid.UUID(shop["id"]))
    assert decrypted_config(SecretBox(settings), source) == {
        "shop_domain": "herald-demo.myshopify.com",
        "access_token": ACCESS_TOKEN,
        "api_version": "2024-10",
        "webhook_secret": WEBHOOK_SECRET,
    }
    other = db_session.get(DataSource, uuid.UUID(gtm["id"]))
    assert decrypted_config(SecretBox(settings), other) == {"container_id": "GTM-AB12CD3"}

    wrong = SecretBox(replace(settings, encryption_key=Fernet.generate_key().decode()))
    with pytest.raises(SecretUnreadable) as caught:
        decrypted_config(wrong, source)
    assert set(caught.value.fields) == {"config.access_token", "config.webhook_secret"}


def test_short_secrets_show_nothing(client, alice):
    source = create(client, alice, shopify_body(access_token="shpat_tiny", webhook_secret="abc"))
    assert source["config"]["access_token"] == "****"
    assert source["config"]["webhook_secret"] == "****"


def test_key_rotation_with_two_keys_and_the_rotate_command(client, alice, settings, db_session):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_app = app_with_keys(settings, old)
    shop = create(old_app.test_client(), alice, shopify_body())
    gtm = create(old_app.test_client(), alice, GTM)
    before = stored_config(db_session, shop["id"])

    # Only the new key: the row is unreadable, yet list and detail answer, flagged.
    new_only = app_with_keys(settings, new)
    listed = new_only.test_client().get(URL, headers=alice["headers"])
    assert listed.status_code == 200
    flagged = {item["id"]: item for item in listed.get_json()["items"]}[shop["id"]]
    assert sorted(flagged["unreadable_secrets"]) == ["access_token", "webhook_secret"]
    assert flagged["config"]["access_token"] == "****"
    assert flagged["config"]["shop_domain"] == "herald-demo.myshopify.com"
    refused = new_only.test_cli_runner().invoke(args=["secrets", "rotate"])
    assert refused.exit_code != 0 and shop["id"] in refused.output
    assert stored_config(db_session, shop["id"]) == before  # nothing written

    # New key first, old key kept: the old ciphertext still reads.
    both = app_with_keys(settings, f"{new},{old}")
    read = both.test_client().get(f"{URL}/{shop['id']}", headers=alice["headers"])
    assert read.get_json()["config"]["access_token"] == "shpat_****1100"
    assert read.get_json()["unreadable_secrets"] == []

    result = both.test_cli_runner().invoke(args=["secrets", "rotate", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert "rotated 2 secret(s) across 1 source(s); 0 already under the current key" in (
        result.output
    )
    after = stored_config(db_session, shop["id"])
    token = after["access_token"]["ciphertext"]
    assert token != before["access_token"]["ciphertext"]
    assert Fernet(new.encode()).decrypt(token.encode()).decode() == ACCESS_TOKEN
    with pytest.raises(InvalidToken):
        Fernet(old.encode()).decrypt(token.encode())
    assert stored_config(db_session, gtm["id"]) == {"container_id": "GTM-AB12CD3"}

    # The new key alone now reads everything; a second run has nothing to do.
    reread = new_only.test_client().get(f"{URL}/{shop['id']}", headers=alice["headers"])
    assert reread.get_json()["unreadable_secrets"] == []
    assert reread.get_json()["config"]["webhook_secret"] == "****2f1a"
    again = both.test_cli_runner().invoke(args=["secrets", "rotate"])
    assert again.exit_code == 0
    assert "rotated 0 secret(s) across 1 source(s); 2 already under the current key" in (
        again.output
    )
    assert stored_config(db_session, shop["id"]) == after


def test_rotation_batches_cover_every_source(client, alice, settings, db_session):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_client = app_with_keys(settings, old).test_client()
    ids = [create(old_client, alice, {**PIXEL, "name": f"p{i}"})["id"] for i in range(5)]
    result = (
        app_with_keys(settings, f"{new},{old}")
        .test_cli_runner()
        .invoke(args=["secrets", "rotate", "--batch-size", "2"])
    )
    assert result.exit_code == 0, result.output
    assert "rotated 5 secret(s) across 5 source(s)" in result.output
    fernet = Fernet(new.encode())
    for source_id in ids:
        token = stored_config(db_session, source_id)["access_token"]["ciphertext"]
        assert fernet.decrypt(token.encode()).decode() == PIXEL_TOKEN

    bad_key = app_with_keys(settings, f"{new},not-a-fernet-key").test_cli_runner()
    refused = bad_key.invoke(args=["secrets", "rotate"])
    assert refused.exit_code != 0
    assert "ENCRYPTION_KEY entry 2 of 2 is not a valid Fernet key" in refused.output


# -- validation --------------------------------------------------------------------------


# (body, field the error must name, text one of its messages must contain)
INVALID_CREATES = [
    (shopify_body(foo=1), "config.foo", "Unknown field."),
    ({**GTM, "config": {"container_id": "GTM-AB12CD3", "extra": "x"}}, "config.extra", None),
    ({**GTM, "config": {}}, "config.container_id", "Missing data for required field."),
    ({**GTM, "config": {"container_id": None}}, "config.container_id", "may not be null"),
    ({**GTM, "config": {"container_id": "UA-1234"}}, "config.container_id", "GTM-"),
    ({**GTM, "config": {"container_id": 12345}}, "config.container_id", "string"),
    (shopify_body(shop_domain="shop.example.com"), "config.shop_domain", "myshopify.com"),
    (
        shopify_body(shop_domain="https://x.myshopify.com/admin"),
        "config.shop_domain",
        "myshopify",
    ),
    (shopify_body(api_version="2024-13"), "config.api_version", "YYYY-MM"),
    (shopify_body(api_version="2024-02"), "config.api_version", "01, 04, 07, 10"),
    (shopify_body(access_token=""), "config.access_token", "empty"),
    (shopify_body(access_token="shpat_ a"), "config.access_token", "whitespace"),
    (shopify_body(access_token="x" * 2049), "config.access_token", "2048"),
    (shopify_body(access_token="shpat_****1100"), "config.access_token", "masked"),
    (shopify_body(webhook_secret=["a"]), "config.webhook_secret", "string"),
    ({**PIXEL, "config": {"pixel_id": "12ab45"}}, "config.pixel_id", "digits"),
    ({**PIXEL, "config": {"pixel_id": 123456789012345}}, "config.pixel_id", "string"),
    ({**GTM, "config": "GTM-AB12CD3"}, "config", None),
    ({**GTM, "source_type": "mailchimp"}, "source_type", None),
    ({**GTM, "status": "error"}, "status", None),
    ({**GTM, "name": ""}, "name", None),
    ({"source_type": "gtm", "config": {"container_id": "GTM-AB12CD3"}}, "name", None),
    ({**GTM, "ingest_key": "mine"}, "ingest_key", None),
    ({**GTM, "last_sync_at": "2024-01-01T00:00:00Z"}, "last_sync_at", None),
]


def test_create_validation_names_the_field(client, alice, db_session):
    # One test over the table: each case is a request, not a fresh login.
    for body, field, message in INVALID_CREATES:
        response = client.post(URL, json=body, headers=alice["headers"])
        error = assert_error(response, 422, "validation_error", field)
        if message:
            assert any(message in m for m in error["fields"][field]), (field, error)
    assert raw_configs(db_session) == []


def test_missing_required_keys_are_all_named(client, alice):
    error = assert_error(
        client.post(
            URL,
            json={"name": "s", "source_type": "shopify", "config": {"api_version": "2025-01"}},
            headers=alice["headers"],
        ),
        422,
        "validation_error",
        "config.shop_domain",
        "config.access_token",
    )
    assert "config.webhook_secret" not in error["fields"]


# -- update ------------------------------------------------------------------------------


def test_patch_name_and_status(client, alice):
    source = create(client, alice, GTM)
    url = f"{URL}/{source['id']}"
    response = client.patch(
        url, json={"name": "Tags", "status": "paused"}, headers=alice["headers"]
    )
    assert response.status_code == 200
    body = response.get_json()
    assert (body["name"], body["status"]) == ("Tags", "paused")
    assert body["ingest_key"] == source["ingest_key"]
    assert client.get(url, headers=alice["headers"]).get_json()["status"] == "paused"
    same_type = client.patch(url, json={"source_type": "gtm"}, headers=alice["headers"])
    assert same_type.status_code == 200
    assert_error(
        client.patch(url, json={"source_type": "shopify"}, headers=alice["headers"]),
        422,
        "validation_error",
        "source_type",
    )
    assert_error(
        client.patch(url, json={"status": "error"}, headers=alice["headers"]),
        422,
        "validation_error",
        "status",
    )
    for bad in ({"name": None}, {"name": ""}, {"last_sync_at": None}, {"ingest_key": "x"}):
        assert_error(
            client.patch(url, json=bad, headers=alice["headers"]),
            422,
            "validation_error",
            next(iter(bad)),
        )
    assert client.get(url, headers=alice["headers"]).get_json()["name"] == "Tags"


def test_error_status_is_cleared_by_setting_active(client, alice, db_session):
    source = create(client, alice, GTM)
    db_session.execute(
        text("UPDATE data_sources SET status = 'error' WHERE id = :id"), {"id": source["id"]}
    )
    db_session.commit()
    listed = client.get(f"{URL}?status=error", headers=alice["headers"]).get_json()["items"]
    assert [item["id"] for item in listed] == [source["id"]]
    fixed = client.patch(
        f"{URL}/{source['id']}", json={"status": "active"}, headers=alice["headers"]
    )
    assert fixed.get_json()["status"] == "active"


def test_patch_config_merges_and_keeps_secrets_unless_replaced(client, alice, db_session):
    source = create(client, alice, shopify_body())
    url = f"{URL}/{source['id']}"
    before = stored_config(db_session, source["id"])

    # Secrets left out keep their exact ciphertext.
    changed = client.patch(
        url, json={"config": {"api_version": "2025-01"}}, headers=alice["headers"]
    )
    assert changed.status_code == 200
    assert changed.get_json()["config"]["api_version"] == "2025-01"
    after = stored_config(db_session, source["id"])
    assert after["access_token"] == before["access_token"]
    assert after["webhook_secret"] == before["webhook_secret"]

    # The whole config echoed back as shown (masks included) changes no secret.
    shown = client.get(url, headers=alice["headers"]).get_json()["config"]
    echoed = client.patch(url, json={"config": shown}, headers=alice["headers"])
    assert echoed.status_code == 200 and echoed.get_json()["config"] == shown
    assert stored_config(db_session, source["id"]) == after

    # A masked value that is not this secret's mask is refused, not stored.
    assert_error(
        client.patch(
            url, json={"config": {"access_token": "shpat_****9999"}}, headers=alice["headers"]
        ),
        422,
        "validation_error",
        "config.access_token",
    )
    assert stored_config(db_session, source["id"]) == after

    # A new secret replaces the old one.
    new_token = "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"
    replaced = client.patch(
        url, json={"config": {"access_token": new_token}}, headers=alice["headers"]
    )
    assert replaced.get_json()["config"]["access_token"] == "shpat_****8888"
    assert new_token not in replaced.get_data(as_text=True)
    row = db_session.get(DataSource, uuid.UUID(source["id"]))
    db_session.refresh(row)
    plain = decrypted_config(SecretBox(client.application.extensions["herald"].settings), row)
    assert plain["access_token"] == new_token and plain["webhook_secret"] == WEBHOOK_SECRET

    # null removes an optional secret (and an optional plain key); required ones stay.
    removed = client.patch(
        url,
        json={"config": {"webhook_secret": None, "api_version": None}},
        headers=alice["headers"],
    )
    assert removed.get_json()["config"] == {
        "shop_domain": "herald-demo.myshopify.com",
        "access_token": "shpat_****8888",
    }
    assert set(stored_config(db_session, source["id"])) == {"shop_domain", "access_token"}
    for key in ("access_token", "shop_domain"):
        assert_error(
            client.patch(url, json={"config": {key: None}}, headers=alice["headers"]),
            422,
            "validation_error",
            f"config.{key}",
        )
    assert_error(
        client.patch(url, json={"config": {"pixel_id": "123456"}}, headers=alice["headers"]),
        422,
        "validation_error",
        "config.pixel_id",
    )
    assert_error(
        client.patch(
            url, json={"config": {"shop_domain": "evil.example.com"}}, headers=alice["headers"]
        ),
        422,
        "validation_error",
        "config.shop_domain",
    )
    # The removed optional secret cannot be "kept" by echoing a mask.
    assert_error(
        client.patch(url, json={"config": {"webhook_secret": "****"}}, headers=alice["headers"]),
        422,
        "validation_error",
        "config.webhook_secret",
    )


# -- list and delete ---------------------------------------------------------------------


def test_list_pages_newest_first_and_filters(client, alice):
    first = create(client, alice, GTM)
    second = create(client, alice, PIXEL)
    third = create(client, alice, shopify_body())
    paused = create(client, alice, {**GTM, "name": "Paused", "status": "paused"})

    page = client.get(f"{URL}?limit=3", headers=alice["headers"]).get_json()
    assert [s["id"] for s in page["items"]] == [paused["id"], third["id"], second["id"]]
    rest = client.get(
        f"{URL}?limit=3&cursor={page['next_cursor']}", headers=alice["headers"]
    ).get_json()
    assert [s["id"] for s in rest["items"]] == [first["id"]] and rest["next_cursor"] is None

    by_type = client.get(f"{URL}?source_type=gtm", headers=alice["headers"]).get_json()
    assert [s["id"] for s in by_type["items"]] == [paused["id"], first["id"]]
    by_status = client.get(f"{URL}?status=paused", headers=alice["headers"]).get_json()
    assert [s["id"] for s in by_status["items"]] == [paused["id"]]
    both = client.get(f"{URL}?source_type=gtm&status=active", headers=alice["headers"])
    assert [s["id"] for s in both.get_json()["items"]] == [first["id"]]

    assert_error(
        client.get(f"{URL}?source_type=ftp", headers=alice["headers"]),
        422,
        "validation_error",
        "source_type",
    )
    assert_error(
        client.get(f"{URL}?status=broken", headers=alice["headers"]),
        422,
        "validation_error",
        "status",
    )
    assert_error(
        client.get(f"{URL}?cursor=garbage", headers=alice["headers"]),
        422,
        "validation_error",
        "cursor",
    )
    assert_error(
        client.get(f"{URL}?limit=0", headers=alice["headers"]), 422, "validation_error", "limit"
    )


def test_delete_removes_the_source_and_its_events(client, alice, db_session):
    source = create(client, alice, GTM)
    keep = create(client, alice, PIXEL)
    db_session.add(
        DataEvent(
            data_source_id=uuid.UUID(source["id"]),
            event_type="page_view",
            occurred_at=datetime(2024, 5, 1, tzinfo=UTC),
        )
    )
    db_session.commit()
    response = client.delete(f"{URL}/{source['id']}", headers=alice["headers"])
    assert response.status_code == 204 and response.get_data() == b""
    assert_error(client.get(f"{URL}/{source['id']}", headers=alice["headers"]), 404, "not_found")
    assert_error(client.delete(f"{URL}/{source['id']}", headers=alice["headers"]), 404, "not_found")
    assert db_session.scalar(select(DataEvent.id)) is None
    assert list(db_session.scalars(select(DataSource.id))) == [uuid.UUID(keep["id"])]


# -- tenancy -----------------------------------------------------------------------------


def test_another_users_source_is_not_found_on_every_route(client, alice, bob, db_session):
    source = create(client, alice, PIXEL)
    url = f"{URL}/{source['id']}"
    before = db_session.execute(
        text("SELECT name, config::text, ingest_key FROM data_sources")
    ).all()
    attempts = [
        client.get(url, headers=bob["headers"]),
        client.patch(url, json={"name": "mine now"}, headers=bob["headers"]),
        client.patch(url, json={"config": {"pixel_id": "99999"}}, headers=bob["headers"]),
        client.post(f"{url}/ingest-key/rotate", headers=bob["headers"]),
        client.delete(url, headers=bob["headers"]),
    ]
    for response in attempts:
        assert_error(response, 404, "not_found")
    assert (
        attempts[0].get_json()
        == client.get(f"{URL}/{uuid.uuid4()}", headers=bob["headers"]).get_json()
    )
    assert client.get(URL, headers=bob["headers"]).get_json() == {
        "items": [],
        "next_cursor": None,
    }
    after = db_session.execute(text("SELECT name, config::text, ingest_key FROM data_sources"))
    assert after.all() == before
    assert client.get(url, headers=alice["headers"]).status_code == 200


def test_routes_are_in_the_openapi_document(client):
    paths = client.get("/api/v1/openapi.json").get_json()["paths"]
    assert set(paths[URL]) == {"get", "post"}
    assert set(paths[f"{URL}/{{source_id}}"]) >= {"get", "patch", "delete"}
    assert paths[f"{URL}/{{source_id}}/ingest-key/rotate"]["post"]["security"] == [
        {"bearerAuth": []}
    ]
