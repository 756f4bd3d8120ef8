"""/api/v1/contacts: CRUD, list filters, GDPR erasure and the bulk upsert, through the real
app on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, text

from engine.models import (
    Campaign,
    CampaignChannel,
    Contact,
    ContactSource,
    DataEvent,
    DataSource,
    Delivery,
)
from tests.helpers import assert_error

URL = "/api/v1/contacts"


def create(client, account, **body):
    return client.post(URL, json=body, headers=account["headers"])


def bulk(client, account, rows):
    return client.post(f"{URL}/bulk", json={"contacts": rows}, headers=account["headers"])


def stored(db_session, **where) -> list[Contact]:
    db_session.expire_all()
    stmt = select(Contact)
    for column, value in where.items():
        stmt = stmt.where(getattr(Contact, column) == value)
    return list(db_session.scalars(stmt))


# -- create / read --------------------------------------------------------------------


def test_create_normalizes_every_field_and_reads_back(client, alice):
    response = create(
        client,
        alice,
        external_id="  crm-1 ",
        email="  Ada@Example.COM ",
        phone="+33 6 12 34 56 78",
        whatsapp="+1 (202) 555-0143",
        push_tokens=["tok-a", "tok-b", "tok-a"],
        first_name="Ada",
        last_name="Lovelace",
        timezone="europe/paris",
        locale="pt_br",
        attributes={"tier": "gold", "orders": 3},
        consent={"email": True, "sms": True},
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["external_id"] == "crm-1"
    assert body["email"] == "ada@example.com"
    assert body["phone"] == "+33612345678"
    assert body["whatsapp"] == "+12025550143"
    assert body["push_tokens"] == ["tok-a", "tok-b"]
    assert body["timezone"] == "Europe/Paris"
    assert body["locale"] == "pt-BR"
    assert body["attributes"] == {"tier": "gold", "orders": 3}
    assert body["consent"] == {"email": True, "sms": True, "push": False, "whatsapp": False}
    assert datetime.fromisoformat(body["created_at"]).utcoffset() == timedelta(0)

    fetched = client.get(f"{URL}/{body['id']}", headers=alice["headers"])
    assert fetched.status_code == 200
    assert fetched.get_json() == body


def test_a_contact_without_external_id_or_email_can_be_created(client, alice):
    response = create(client, alice, phone="+447911123456")
    assert response.status_code == 201
    assert response.get_json()["external_id"] is None
    assert response.get_json()["consent"] == dict.fromkeys(
        ("email", "sms", "push", "whatsapp"), False
    )


INVALID_FIELDS = [
    ({"email": "not-an-email"}, "email", "email"),
    ({"email": 42}, "email", "string"),
    ({"phone": "06 12 34 56 78"}, "phone", "international format"),
    ({"phone": "+1 555"}, "phone", "valid phone"),
    ({"whatsapp": "+33 1"}, "whatsapp", "valid phone"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone", "IANA"),
    ({"locale": "not a locale"}, "locale", "BCP 47"),
    ({"consent": {"sms": "yes"}}, "consent.sms", "boolean"),
    ({"consent": {"fax": True}}, "consent.fax", "Unknown"),
    ({"push_tokens": ["ok", "  "]}, "push_tokens[1]", "empty"),
    ({"push_tokens": [f"t{i}" for i in range(21)]}, "push_tokens", "20"),
    ({"attributes": {"blob": "x" * 17000}}, "attributes", "16 KB"),
    ({"attributes": {f"k{i}": i for i in range(101)}}, "attributes", "100"),
    ({"attributes": ["not", "an", "object"]}, "attributes", "mapping"),
    ({"first_name": "x" * 101}, "first_name", "100"),
    ({"external_id": "nul\x00byte"}, "external_id", "NUL"),
    ({"first_name": "lone \ud800 surrogate"}, "first_name", "Unicode"),
    ({"shoe_size": 44}, "shoe_size", "Unknown"),
]


def test_invalid_fields_answer_422_naming_the_field(client, alice):
    for body, field, message_part in INVALID_FIELDS:
        error = assert_error(create(client, alice, **body), 422, "validation_error", field)
        assert any(message_part in message for message in error["fields"][field]), error


def test_several_bad_fields_are_all_named(client, alice):
    error = assert_error(
        create(client, alice, email="x@", phone="123", timezone="Nowhere", consent={"sms": 1}),
        422,
        "validation_error",
    )
    assert {"email", "phone", "timezone", "consent.sms"} <= set(error["fields"])


# -- uniqueness -----------------------------------------------------------------------


def test_duplicate_external_id_or_email_answers_409_naming_field_and_holder(client, alice):
    first = create(client, alice, external_id="crm-1", email="ada@example.com").get_json()
    error = assert_error(
        create(client, alice, email="ADA@example.com"), 409, "contact_exists", "email"
    )
    assert error["fields"]["email"] == [f"in use by {first['id']}"]
    error = assert_error(
        create(client, alice, external_id="crm-1"), 409, "contact_exists", "external_id"
    )
    assert "email" not in error["fields"]

    other = create(client, alice, email="grace@example.com").get_json()
    response = client.patch(
        f"{URL}/{other['id']}", json={"email": "ada@example.com"}, headers=alice["headers"]
    )
    assert_error(response, 409, "contact_exists", "email")
    # Setting a contact's own key again is no conflict.
    response = client.patch(
        f"{URL}/{first['id']}", json={"email": "ada@example.com"}, headers=alice["headers"]
    )
    assert response.status_code == 200


def test_keys_are_unique_per_user_not_globally(client, alice, bob):
    assert create(client, alice, external_id="crm-1", email="ada@example.com").status_code == 201
    assert create(client, bob, external_id="crm-1", email="ada@example.com").status_code == 201


# -- update ---------------------------------------------------------------------------


def test_patch_changes_only_given_fields_and_merges_attributes(client, alice):
    contact = create(
        client,
        alice,
        email="ada@example.com",
        phone="+33612345678",
        push_tokens=["old"],
        attributes={"tier": "gold", "city": "Paris", "score": 1},
        consent={"email": True, "sms": True},
    ).get_json()
    response = client.patch(
        f"{URL}/{contact['id']}",
        json={
            "first_name": "Ada",
            "phone": None,
            "push_tokens": ["new-1", "new-2"],
            "attributes": {"tier": "platinum", "city": None, "visits": 7},
            "consent": {"sms": False},
        },
        headers=alice["headers"],
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["first_name"] == "Ada"
    assert body["email"] == "ada@example.com"
    assert body["phone"] is None
    assert body["push_tokens"] == ["new-1", "new-2"]
    assert body["attributes"] == {"tier": "platinum", "score": 1, "visits": 7}
    assert body["consent"] == {"email": True, "sms": False, "push": False, "whatsapp": False}
    assert body["updated_at"] >= contact["updated_at"]


def test_patch_validation_names_fields(client, alice):
    contact = create(client, alice, email="ada@example.com").get_json()
    response = client.patch(
        f"{URL}/{contact['id']}",
        json={"timezone": "Paris", "consent": {"push": None}},
        headers=alice["headers"],
    )
    assert_error(response, 422, "validation_error", "timezone", "consent.push")


# -- tenants --------------------------------------------------------------------------


def test_another_users_contact_is_404_on_every_route(client, alice, bob):
    contact = create(client, alice, email="ada@example.com").get_json()
    path = f"{URL}/{contact['id']}"
    assert_error(client.get(path, headers=bob["headers"]), 404, "not_found")
    assert_error(
        client.patch(path, json={"first_name": "Eve"}, headers=bob["headers"]), 404, "not_found"
    )
    assert_error(client.delete(path, headers=bob["headers"]), 404, "not_found")
    assert client.get(URL, headers=bob["headers"]).get_json()["items"] == []
    missing = f"{URL}/{uuid.uuid4()}"
    assert_error(client.get(missing, headers=alice["headers"]), 404, "not_found")
    # Alice's contact is untouched.
    assert client.get(path, headers=alice["headers"]).get_json()["first_name"] is None


def test_contact_routes_need_a_token(client):
    assert_error(client.get(URL), 401, "unauthorized")
    assert_error(client.post(f"{URL}/bulk", json={"contacts": []}), 401, "unauthorized")


# -- list -----------------------------------------------------------------------------


def test_list_pages_newest_first_without_repeats(client, alice):
    ids = [create(client, alice, email=f"p{i}@example.com").get_json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(URL, query_string=query, headers=alice["headers"]).get_json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert_error(
        client.get(URL, query_string={"cursor": "garbage"}, headers=alice["headers"]),
        422,
        "validation_error",
        "cursor",
    )


def test_list_filters_by_email_external_id_and_attributes(client, alice):
    gold = create(
        client,
        alice,
        external_id="g-1",
        email="gold@example.com",
        attributes={"tier": "gold", "age": 42, "city": "Paris"},
    ).get_json()
    create(client, alice, email="silver@example.com", attributes={"tier": "silver", "age": "42"})
    create(client, alice, email="none@example.com")

    def ids(**query):
        response = client.get(URL, query_string=query, headers=alice["headers"])
        assert response.status_code == 200, response.get_json()
        return {item["email"] for item in response.get_json()["items"]}

    assert ids(email=" GOLD@example.com") == {"gold@example.com"}
    assert ids(external_id="g-1") == {"gold@example.com"}
    assert ids(external_id="nope") == set()
    assert ids(attribute="tier:gold") == {"gold@example.com"}
    assert ids(attribute="age:42") == {"gold@example.com", "silver@example.com"}
    assert ids(attribute=["age:42", "city:Paris"]) == {gold["email"]}
    assert ids(attribute="tier:bronze") == set()
    assert_error(
        client.get(URL, query_string={"attribute": "no-colon"}, headers=alice["headers"]),
        422,
        "validation_error",
        "attribute[0]",
    )
    assert_error(
        client.get(URL, query_string={"email": "a\x00@example.com"}, headers=alice["headers"]),
        422,
        "validation_error",
        "email",
    )


# -- GDPR erasure ---------------------------------------------------------------------


@pytest.fixture
def delivered_contact(client, alice, db_session):
    """Alice's contact with two deliveries (one sent and opened, one queued), an event
    and a source link, all written directly."""
    contact = create(client, alice, email="ada@example.com", phone="+33612345678").get_json()
    contact_id = uuid.UUID(contact["id"])
    campaign = Campaign(user_id=alice["id"], name="Spring")
    db_session.add(campaign)
    db_session.flush()
    email_channel = CampaignChannel(
        campaign_id=campaign.id, channel_type="email", sent_count=1, opened_count=1
    )
    sms_channel = CampaignChannel(campaign_id=campaign.id, channel_type="sms")
    source = DataSource(user_id=alice["id"], name="Shop", source_type="shopify")
    db_session.add_all([email_channel, sms_channel, source])
    db_session.flush()
    now = datetime.now(UTC)
    db_session.add_all(
        [
            Delivery(
                campaign_channel_id=email_channel.id,
                contact_id=contact_id,
                address="ada@example.com",
                status="sent",
                sent_at=now,
                opened_at=now,
            ),
            Delivery(
                campaign_channel_id=sms_channel.id,
                contact_id=contact_id,
                address="+33612345678",
                status="queued",
            ),
            DataEvent(
                data_source_id=source.id,
                contact_id=contact_id,
                event_type="order_placed",
                occurred_at=now,
            ),
            ContactSource(data_source_id=source.id, contact_id=contact_id, external_id="shop-1"),
        ]
    )
    db_session.commit()
    return {"id": contact_id, "channel_id": email_channel.id}


def test_delete_erases_the_contact_and_redacts_its_deliveries(
    client, alice, db_session, delivered_contact
):
    contact_id = delivered_contact["id"]
    response = client.delete(f"{URL}/{contact_id}", headers=alice["headers"])
    assert response.status_code == 204
    assert_error(client.get(f"{URL}/{contact_id}", headers=alice["headers"]), 404, "not_found")

    db_session.expire_all()
    deliveries = db_session.scalars(select(Delivery).order_by(Delivery.id)).all()
    assert [(d.contact_id, d.address, d.status) for d in deliveries] == [
        (None, None, "sent"),
        (None, None, "cancelled"),
    ]
    assert deliveries[0].opened_at is not None
    channel = db_session.get(CampaignChannel, delivered_contact["channel_id"])
    sent_rows = sum(1 for d in deliveries if d.sent_at is not None)
    assert (channel.sent_count, channel.opened_count) == (1, 1) == (sent_rows, 1)
    assert db_session.scalar(select(DataEvent.contact_id)) is None
    assert db_session.scalars(select(ContactSource)).all() == []
    raw = db_session.execute(text("SELECT address FROM deliveries")).scalars().all()
    assert "ada@example.com" not in raw and "+33612345678" not in raw


# -- bulk upsert ----------------------------------------------------------------------


def test_bulk_creates_updates_and_rejects_row_by_row(client, alice, db_session):
    by_ext = create(client, alice, external_id="crm-1", email="one@example.com").get_json()
    by_email = create(client, alice, email="two@example.com", first_name="Two").get_json()
    holder = create(client, alice, external_id="crm-9", email="taken@example.com").get_json()

    response = bulk(
        client,
        alice,
        [
            {"external_id": "crm-1", "first_name": "One", "consent": {"sms": True}},
            {"email": "TWO@example.com", "last_name": "Second"},
            {"external_id": "crm-new", "email": "new@example.com", "phone": "+33612345678"},
            {"external_id": "crm-1", "email": "taken@example.com"},
            {"email": "bad@", "phone": "12"},
            {"first_name": "No key"},
            {"external_id": "crm-9", "timezone": "Nowhere/Special"},
        ],
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["created"], body["updated"], body["rejected"]) == (1, 2, 4)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["status"] for r in results] == [
        "updated",
        "updated",
        "created",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]
    assert results[0] == {"index": 0, "status": "updated", "id": by_ext["id"], "errors": {}}
    assert results[1]["id"] == by_email["id"]
    assert results[3] == {
        "index": 3,
        "status": "rejected",
        "id": None,
        "errors": {"email": [f"in use by {holder['id']}"]},
    }
    assert set(results[4]["errors"]) == {"email", "phone"}
    assert set(results[5]["errors"]) == {"external_id", "email"}
    assert set(results[6]["errors"]) == {"timezone"}

    one = stored(db_session, external_id="crm-1")[0]
    assert (one.first_name, one.email, one.consent_sms) == ("One", "one@example.com", True)
    two = stored(db_session, email="two@example.com")[0]
    assert (two.first_name, two.last_name) == ("Two", "Second")
    new = stored(db_session, external_id="crm-new")[0]
    assert (str(new.id), new.phone, new.consent_email) == (results[2]["id"], "+33612345678", False)
    # Rejected rows wrote nothing: crm-9 kept its time zone, nobody got "No key".
    assert stored(db_session, external_id="crm-9")[0].timezone is None
    assert stored(db_session, first_name="No key") == []
    assert len(stored(db_session)) == 4


def test_bulk_new_external_id_with_an_email_held_under_another_external_id_is_rejected(
    client, alice, db_session
):
    holder = create(client, alice, external_id="crm-1", email="ada@example.com").get_json()
    keyless = create(client, alice, email="grace@example.com").get_json()
    body = bulk(
        client,
        alice,
        [
            {"external_id": "crm-2", "email": "ada@example.com"},
            # Matched on email; the contact had no external_id, so it takes this one.
            {"external_id": "crm-3", "email": "grace@example.com"},
        ],
    ).get_json()
    assert body["results"][0]["errors"] == {"email": [f"in use by {holder['id']}"]}
    assert body["results"][1] == {
        "index": 1,
        "status": "updated",
        "id": keyless["id"],
        "errors": {},
    }
    assert stored(db_session, external_id="crm-3")[0].email == "grace@example.com"


def test_bulk_folds_repeated_keys_in_order(client, alice, db_session):
    body = bulk(
        client,
        alice,
        [
            {"external_id": "crm-1", "email": "ada@example.com", "attributes": {"a": 1, "b": 2}},
            {"email": "ada@example.com", "first_name": "Ada", "attributes": {"b": None, "c": 3}},
            {"external_id": "crm-1", "consent": {"push": True}},
            {"external_id": "crm-2", "email": "ada@example.com"},
        ],
    ).get_json()
    statuses = [(r["status"], r["id"]) for r in body["results"]]
    first_id = statuses[0][1]
    assert statuses[:3] == [("created", first_id), ("updated", first_id), ("updated", first_id)]
    assert body["results"][3]["errors"] == {"email": [f"in use by {first_id}"]}
    assert (body["created"], body["updated"], body["rejected"]) == (1, 2, 1)
    (contact,) = stored(db_session)
    assert str(contact.id) == first_id
    assert contact.first_name == "Ada"
    assert contact.attributes == {"a": 1, "c": 3}
    assert (contact.consent_push, contact.consent_email) == (True, False)


def test_bulk_updates_are_patches_merging_attributes(client, alice, db_session):
    create(
        client,
        alice,
        external_id="crm-1",
        phone="+33612345678",
        push_tokens=["t1"],
        attributes={"keep": "yes", "drop": "me", "change": 1},
        consent={"email": True, "sms": True},
    )
    body = bulk(
        client,
        alice,
        [
            {
                "external_id": "crm-1",
                "email": "ada@example.com",
                "push_tokens": ["t2"],
                "attributes": {"drop": None, "change": 2, "add": [1, 2]},
                "consent": {"sms": False},
            }
        ],
    ).get_json()
    assert body["updated"] == 1
    (contact,) = stored(db_session)
    assert contact.phone == "+33612345678"
    assert contact.email == "ada@example.com"
    assert contact.push_tokens == ["t2"]
    assert contact.attributes == {"keep": "yes", "change": 2, "add": [1, 2]}
    assert (contact.consent_email, contact.consent_sms) == (True, False)


def test_bulk_rows_are_per_user(client, alice, bob, db_session):
    alices = create(client, alice, external_id="crm-1", email="ada@example.com").get_json()
    body = bulk(client, bob, [{"external_id": "crm-1", "email": "ada@example.com"}]).get_json()
    assert body["results"][0]["status"] == "created"
    assert body["results"][0]["id"] != alices["id"]
    assert {c.user_id for c in stored(db_session, external_id="crm-1")} == {alice["id"], bob["id"]}


def test_bulk_rows_postgresql_could_not_store_are_rejected_not_failed(client, alice, db_session):
    body = bulk(
        client,
        alice,
        [
            {"external_id": "ok"},
            {"external_id": "nul", "attributes": {"note": "a\x00b"}},
            {"external_id": "nan", "attributes": {"score": float("nan")}},
            {"external_id": "surrogate", "last_name": "\udc00"},
            {"external_id": "literal", "attributes": {"note": "the text \\u0000 is fine"}},
        ],
    ).get_json()
    assert [r["status"] for r in body["results"]] == [
        "created",
        "rejected",
        "rejected",
        "rejected",
        "created",
    ]
    assert [set(r["errors"]) for r in body["results"][1:4]] == [
        {"attributes"},
        {"attributes"},
        {"last_name"},
    ]
    assert stored(db_session, external_id="literal")[0].attributes == {
        "note": "the text \\u0000 is fine"
    }


def test_bulk_shape_errors_name_contacts(client, alice):
    assert_error(bulk(client, alice, []), 422, "validation_error", "contacts")
    assert_error(
        client.post(f"{URL}/bulk", json={}, headers=alice["headers"]),
        422,
        "validation_error",
        "contacts",
    )
    assert_error(
        bulk(client, alice, [{"email": "a@example.com"}, 7]), 422, "validation_error", "contacts[1]"
    )
    rows = [{"external_id": f"x{i}"} for i in range(10_001)]
    error = assert_error(bulk(client, alice, rows), 422, "validation_error", "contacts")
    assert any("10000" in message for message in error["fields"]["contacts"])


def test_bulk_accepts_10000_rows_with_a_constant_number_of_statements(client, alice, app):
    from api.extensions import db

    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    def run(rows) -> int:
        statements.clear()
        event.listen(db.engine, "before_cursor_execute", count)
        try:
            response = bulk(client, alice, rows)
        finally:
            event.remove(db.engine, "before_cursor_execute", count)
        assert response.status_code == 200, response.get_json()
        return len([s for s in statements if "contacts" in s])

    small = run([{"external_id": f"s{i}", "email": f"s{i}@example.com"} for i in range(10)])
    assert small == 2  # one SELECT to resolve matches, one INSERT
    big_rows = [{"external_id": f"b{i}", "email": f"b{i}@example.com"} for i in range(10_000)]
    assert run(big_rows) == small
    # The same rows again are all updates: still one statement each way.
    big_again = run(big_rows)
    assert big_again == small
    response = client.get(URL, query_string={"external_id": "b9999"}, headers=alice["headers"])
    assert response.get_json()["items"][0]["email"] == "b9999@example.com"


def test_bulk_body_limit_is_20_mb(client, alice):
    padding = "x" * 1000
    row = {"external_id": "pad", "attributes": {"note": padding}}
    # About 2 MB: over the default 1 MB, accepted on this route.
    medium = json.dumps({"contacts": [{**row, "external_id": f"m{i}"} for i in range(2000)]})
    assert len(medium) > 1024 * 1024
    response = client.post(
        f"{URL}/bulk", data=medium, content_type="application/json", headers=alice["headers"]
    )
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.get_json()["created"] == 2000

    huge = json.dumps({"contacts": [row], "padding": "y" * (20 * 1024 * 1024)})
    response = client.post(
        f"{URL}/bulk", data=huge, content_type="application/json", headers=alice["headers"]
    )
    assert_error(response, 413, "payload_too_large")


def test_bulk_racing_a_single_write_answers_409_and_writes_nothing(app, alice, db_session):
    """A contact inserted (not yet committed) by another transaction holds the email's
    index entry; the batch's INSERT waits on it and fails once it commits."""
    from api.extensions import db
    from engine.errors import Conflict
    from engine.services.contacts import bulk_upsert

    blocker = db.factory()
    blocker.add(Contact(user_id=alice["id"], email="race@example.com"))
    blocker.flush()
    outcome: dict = {}

    def run_batch():
        session = db.factory()
        try:
            bulk_upsert(
                session,
                alice["id"],
                [{"email": "calm@example.com"}, {"email": "race@example.com"}],
            )
            session.commit()
            outcome["result"] = "committed"
        except Conflict as exc:
            session.rollback()
            outcome["result"] = exc.code
        finally:
            session.close()

    batch = threading.Thread(target=run_batch)
    batch.start()
    deadline = time.monotonic() + 10
    while not _someone_waits_on_a_lock(db_session):
        assert time.monotonic() < deadline, "the batch never blocked on the pending insert"
        time.sleep(0.02)
    blocker.commit()
    blocker.close()
    batch.join(10)
    assert outcome == {"result": "concurrent_write"}
    assert [c.email for c in stored(db_session)] == ["race@example.com"]


def _someone_waits_on_a_lock(session) -> bool:
    session.rollback()
    return bool(
        session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    )


def test_openapi_documents_every_contact_route(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    paths = spec["paths"]
    expected = {
        "/api/v1/contacts": {"get", "post"},
        "/api/v1/contacts/{contact_id}": {"get", "patch", "delete"},
        "/api/v1/contacts/bulk": {"post"},
        "/api/v1/contacts/imports": {"get", "post"},
        "/api/v1/contacts/imports/{import_id}": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
        for method in methods:
            assert paths[path][method]["security"] == [{"bearerAuth": []}]
    upload = paths["/api/v1/contacts/imports"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
