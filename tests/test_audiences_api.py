"""/api/v1/campaigns/{id}/audiences, estimates and recipient counts, through the real app
and PostgreSQL. Campaigns, contacts, sources and events are written directly with the
models (their own APIs are tested elsewhere)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, literal, select, update

from engine.audiences import recipients_select
from engine.models import (
    Audience,
    Campaign,
    CampaignChannel,
    Contact,
    ContactSource,
    DataEvent,
    DataSource,
    Delivery,
    Suppression,
)
from tests.helpers import assert_error

API = "/api/v1/campaigns"


def make_campaign(db_session, owner: dict, status: str = "draft") -> uuid.UUID:
    campaign = Campaign(user_id=owner["id"], name="Spring sale", status=status)
    db_session.add(campaign)
    db_session.commit()
    return campaign.id


def set_status(db_session, campaign_id: uuid.UUID, status: str) -> None:
    db_session.execute(update(Campaign).where(Campaign.id == campaign_id).values(status=status))
    db_session.commit()


def make_contact(db_session, owner: dict, **fields) -> uuid.UUID:
    contact = Contact(user_id=owner["id"], **fields)
    db_session.add(contact)
    db_session.commit()
    return contact.id


def make_source(db_session, owner: dict) -> uuid.UUID:
    source = DataSource(user_id=owner["id"], name="Shop", source_type="shopify")
    db_session.add(source)
    db_session.commit()
    return source.id


def add_audience(client, owner: dict, campaign_id, definition, name: str = "Everyone"):
    return client.post(
        f"{API}/{campaign_id}/audiences",
        json={"name": name, "definition": definition},
        headers=owner["headers"],
    )


def created_audience(client, owner, campaign_id, definition, name="Everyone") -> dict:
    response = add_audience(client, owner, campaign_id, definition, name)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def estimate(client, owner, campaign_id, audience_id) -> int:
    response = client.post(
        f"{API}/{campaign_id}/audiences/{audience_id}/estimate", headers=owner["headers"]
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["count"]


# -- CRUD --------------------------------------------------------------------------------


def test_create_read_list_update_delete(client, db_session, alice):
    campaign_id = make_campaign(db_session, alice)
    definition = {"all": [{"field": "attributes.tier", "op": "eq", "value": "gold"}]}
    body = created_audience(client, alice, campaign_id, definition, name="Gold")
    assert body["name"] == "Gold"
    assert body["definition"] == definition
    assert body["campaign_id"] == str(campaign_id)
    assert datetime.fromisoformat(body["created_at"]).utcoffset() == timedelta(0)
    stored = db_session.get(Audience, uuid.UUID(body["id"]))
    assert stored.definition == definition and stored.campaign_id == campaign_id

    url = f"{API}/{campaign_id}/audiences/{body['id']}"
    assert client.get(url, headers=alice["headers"]).get_json() == body

    second = created_audience(client, alice, campaign_id, {"all": []}, name="All")
    first_page = client.get(f"{API}/{campaign_id}/audiences?limit=1", headers=alice["headers"])
    page = first_page.get_json()
    assert [item["id"] for item in page["items"]] == [second["id"]]  # newest first
    rest = client.get(
        f"{API}/{campaign_id}/audiences?limit=1&cursor={page['next_cursor']}",
        headers=alice["headers"],
    ).get_json()
    assert [item["id"] for item in rest["items"]] == [body["id"]]
    assert rest["next_cursor"] is None

    renamed = client.patch(url, json={"name": "Gold members"}, headers=alice["headers"])
    assert renamed.status_code == 200
    assert renamed.get_json()["name"] == "Gold members"
    assert renamed.get_json()["definition"] == definition  # untouched

    new_definition = {"consent": "sms"}
    changed = client.patch(url, json={"definition": new_definition}, headers=alice["headers"])
    assert changed.get_json()["definition"] == new_definition
    assert changed.get_json()["name"] == "Gold members"
    db_session.expire_all()
    assert db_session.get(Audience, uuid.UUID(body["id"])).definition == new_definition

    deleted = client.delete(url, headers=alice["headers"])
    assert deleted.status_code == 204
    assert_error(client.get(url, headers=alice["headers"]), 404, "not_found")
    db_session.expire_all()
    assert db_session.get(Audience, uuid.UUID(body["id"])) is None
    remaining = client.get(f"{API}/{campaign_id}/audiences", headers=alice["headers"]).get_json()
    assert [item["id"] for item in remaining["items"]] == [second["id"]]


def test_audiences_per_campaign_are_limited(client, db_session, alice):
    campaign_id = make_campaign(db_session, alice)
    for index in range(20):
        created_audience(client, alice, campaign_id, {"all": []}, name=f"a{index}")
    assert_error(add_audience(client, alice, campaign_id, {"all": []}), 409, "too_many_audiences")


# -- validation ---------------------------------------------------------------------------


def nested(depth: int) -> dict:
    node: dict = {"consent": "email"}
    for _ in range(depth - 1):
        node = {"not": node}
    return node


# (definition, path of the error, part of its message)
BAD_DEFINITIONS = [
    (
        {"all": [{"consent": "email"}, {"consent": "sms"}, {"field": "email", "op": "foo"}]},
        "definition.all[2].op",
        "unknown operator 'foo'",
    ),
    ({"any": [{"fild": "email"}]}, "definition.any[0].fild", "unknown field"),
    ({"any": [{"fild": "email"}]}, "definition.any[0]", "exactly one of"),
    ({"consent": "email", "colour": 1}, "definition.colour", "unknown field"),
    ({"consent": "email", "all": []}, "definition", "exactly one of"),
    ({"consent": "fax"}, "definition.consent", "must be one of"),
    ({"field": "nickname", "op": "eq", "value": "x"}, "definition.field", "unknown field"),
    ({"field": "attributes.", "op": "eq", "value": "x"}, "definition.field", "each key"),
    ({"field": "attributes.score", "op": "gt", "value": "ten"}, "definition.value", "number"),
    ({"field": "attributes.tier", "op": "eq", "value": None}, "definition.value", "string"),
    ({"field": "attributes.tier", "op": "eq", "value": {"a": 1}}, "definition.value", "string"),
    ({"field": "attributes.tier", "op": "eq"}, "definition.value", "required"),
    ({"field": "attributes.tier", "op": "in", "value": ["a", 1]}, "definition.value", "all"),
    ({"field": "attributes.tier", "op": "in", "value": []}, "definition.value", "non-empty"),
    ({"field": "attributes.tier", "op": "in", "value": [[1]]}, "definition.value[0]", "a"),
    ({"field": "attributes.tier", "op": "exists", "value": 1}, "definition.value", "true"),
    ({"field": "email", "op": "eq", "value": 5}, "definition.value", "email is text"),
    ({"field": "phone", "op": "gt", "value": "1"}, "definition.value", "number"),
    (
        {"field": "created_at", "op": "gt", "value": "2024-01-01T00:00:00"},
        "definition.value",
        "time zone",
    ),
    ({"field": "created_at", "op": "eq", "value": "x"}, "definition.op", "created_at takes"),
    (
        {"not": {"event": "order", "where": [{"field": "value", "op": "gte", "value": [1]}]}},
        "definition.not.where[0].value",
        "number",
    ),
    (
        {"event": "order", "where": [{"field": "a\\b", "op": "exists"}]},
        "definition.where[0].field",
        "without",
    ),
    ({"event": "order", "min_count": 3, "max_count": 1}, "definition.max_count", "min_count"),
    ({"event": "order", "min_count": -1}, "definition.min_count", "between"),
    ({"event": "order", "within_days": 0}, "definition.within_days", "between"),
    ({"event": "order", "within_days": True}, "definition.within_days", "integer"),
    ({"event": "order", "performed": False, "min_count": 1}, "definition.min_count", "not"),
    ({"event": "", "min_count": 1}, "definition.event", "event name"),
    ({"contact_ids": ["nope"]}, "definition.contact_ids[0]", "UUID"),
    ({"contact_ids": "nope"}, "definition.contact_ids", "list"),
    ({"source_id": 12}, "definition.source_id", "UUID"),
    ({"all": {"consent": "email"}}, "definition.all", "list"),
    ({"all": [1]}, "definition.all[0]", "object"),
    (nested(9), "definition" + ".not" * 8, "deeper than 8"),
    ({"any": [{"consent": "email"}] * 200}, "definition", "more than 200"),
    (
        {"contact_ids": [str(uuid.uuid4()) for _ in range(10_001)]},
        "definition.contact_ids",
        "10000",
    ),
    ({"field": "locale", "op": "in", "value": ["fr"] * 1001}, "definition.value", "1000"),
]


def test_bad_definitions_name_the_exact_path(client, db_session, alice):
    # One account for every case: registering costs an Argon2 hash each time.
    campaign_id = make_campaign(db_session, alice)
    for definition, path, message in BAD_DEFINITIONS:
        case = json.dumps(definition)[:200]
        response = add_audience(client, alice, campaign_id, definition)
        error = assert_error(response, 422, "validation_error", path)
        assert any(message in m for m in error["fields"][path]), (case, error)
    assert db_session.scalar(select(Audience.id)) is None


def test_limits_just_inside_are_accepted(client, db_session, alice):
    campaign_id = make_campaign(db_session, alice)
    created_audience(client, alice, campaign_id, nested(8))
    created_audience(client, alice, campaign_id, {"any": [{"consent": "email"}] * 199})
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    created_audience(client, alice, campaign_id, {"contact_ids": ids})


def test_non_object_definition_missing_name_unknown_field_and_nan(client, db_session, alice):
    campaign_id = make_campaign(db_session, alice)
    url = f"{API}/{campaign_id}/audiences"
    headers = alice["headers"]
    assert_error(
        client.post(url, json={"name": "x", "definition": [1]}, headers=headers),
        422,
        "validation_error",
        "definition",
    )
    assert_error(
        client.post(url, json={"definition": {"all": []}}, headers=headers),
        422,
        "validation_error",
        "name",
    )
    assert_error(
        client.post(
            url, json={"name": "", "definition": {"all": []}, "colour": 1}, headers=headers
        ),
        422,
        "validation_error",
        "name",
        "colour",
    )
    not_a_number = (
        '{"name": "x", "definition": {"field": "attributes.a", "op": "gt", "value": NaN}}'
    )
    error = assert_error(
        client.post(url, data=not_a_number, content_type="application/json", headers=headers),
        422,
        "validation_error",
        "definition.value",
    )
    assert error["fields"]["definition.value"] == ["must be a finite number"]


def test_source_must_belong_to_the_user(client, db_session, alice, bob):
    campaign_id = make_campaign(db_session, alice)
    own = make_source(db_session, alice)
    foreign = make_source(db_session, bob)
    definition = {"any": [{"source_id": str(foreign)}, {"not": {"source_id": str(uuid.uuid4())}}]}
    error = assert_error(
        add_audience(client, alice, campaign_id, definition),
        422,
        "validation_error",
        "definition.any[0].source_id",
        "definition.any[1].not.source_id",
    )
    assert error["fields"]["definition.any[0].source_id"] == ["unknown data source"]
    created_audience(client, alice, campaign_id, {"source_id": str(own)})


def test_patch_with_a_bad_definition_changes_nothing(client, db_session, alice):
    campaign_id = make_campaign(db_session, alice)
    body = created_audience(client, alice, campaign_id, {"consent": "email"}, name="Keep")
    url = f"{API}/{campaign_id}/audiences/{body['id']}"
    assert_error(
        client.patch(
            url,
            json={"name": "Changed", "definition": {"any": [{"consent": "pigeon"}]}},
            headers=alice["headers"],
        ),
        422,
        "validation_error",
        "definition.any[0].consent",
    )
    assert_error(
        client.patch(url, json={"name": None}, headers=alice["headers"]),
        422,
        "validation_error",
        "name",
    )
    db_session.expire_all()
    stored = db_session.get(Audience, uuid.UUID(body["id"]))
    assert (stored.name, stored.definition) == ("Keep", {"consent": "email"})


# -- tenancy and editability -----------------------------------------------------------------


def test_other_tenants_and_other_campaigns_answer_404_on_every_route(
    client, db_session, alice, bob
):
    bobs_campaign = make_campaign(db_session, bob)
    bobs_audience = created_audience(client, bob, bobs_campaign, {"all": []})["id"]
    alices_campaign = make_campaign(db_session, alice)
    alices_other = make_campaign(db_session, alice)
    alices_audience = created_audience(client, alice, alices_other, {"all": []})["id"]
    headers = alice["headers"]
    body = {"name": "x", "definition": {"all": []}}

    def campaign_routes(campaign_id):
        base = f"{API}/{campaign_id}/audiences"
        yield client.get(base, headers=headers)
        yield client.post(base, json=body, headers=headers)
        yield client.get(f"{API}/{campaign_id}/recipients/count", headers=headers)

    def audience_routes(campaign_id, audience_id):
        url = f"{API}/{campaign_id}/audiences/{audience_id}"
        yield client.get(url, headers=headers)
        yield client.patch(url, json={"name": "y"}, headers=headers)
        yield client.delete(url, headers=headers)
        yield client.post(f"{url}/estimate", headers=headers)

    # Bob's campaign (with Bob's audience), and a campaign that does not exist.
    for campaign_id, audience_id in ((bobs_campaign, bobs_audience), (uuid.uuid4(), uuid.uuid4())):
        responses = [*campaign_routes(campaign_id), *audience_routes(campaign_id, audience_id)]
        assert len(responses) == 7
        for response in responses:
            error = assert_error(response, 404, "not_found")
            assert error["message"] == "campaign not found"
    # Alice's own campaign, but an audience of another campaign (hers, then Bob's) or none.
    for audience_id in (alices_audience, bobs_audience, uuid.uuid4()):
        for response in audience_routes(alices_campaign, audience_id):
            error = assert_error(response, 404, "not_found")
            assert error["message"] == "audience not found"
    db_session.expire_all()
    assert db_session.get(Audience, uuid.UUID(bobs_audience)).name == "Everyone"
    assert db_session.get(Audience, uuid.UUID(alices_audience)).name == "Everyone"
    owners = db_session.scalars(select(Audience.campaign_id)).all()
    assert sorted(map(str, owners)) == sorted([str(bobs_campaign), str(alices_other)])


@pytest.mark.parametrize("status", ["running", "completed", "cancelled"])
def test_content_edits_need_an_editable_campaign(client, db_session, alice, status):
    campaign_id = make_campaign(db_session, alice)
    make_contact(db_session, alice, email="ada@example.com", consent_email=True)
    audience = created_audience(client, alice, campaign_id, {"all": []})
    url = f"{API}/{campaign_id}/audiences/{audience['id']}"
    set_status(db_session, campaign_id, status)

    for response in (
        add_audience(client, alice, campaign_id, {"all": []}),
        client.patch(url, json={"name": "Renamed"}, headers=alice["headers"]),
        client.delete(url, headers=alice["headers"]),
    ):
        error = assert_error(response, 409, "campaign_not_editable")
        assert error["current_status"] == status
    db_session.expire_all()
    assert db_session.scalars(select(Audience.name)).all() == ["Everyone"]
    # Reading, estimating and counting work in any status.
    assert client.get(url, headers=alice["headers"]).status_code == 200
    assert estimate(client, alice, campaign_id, audience["id"]) == 1
    counts = client.get(f"{API}/{campaign_id}/recipients/count", headers=alice["headers"])
    assert counts.get_json()["email"] == 1


@pytest.mark.parametrize("status", ["scheduled", "paused"])
def test_scheduled_and_paused_campaigns_are_editable(client, db_session, alice, status):
    campaign_id = make_campaign(db_session, alice, status=status)
    audience = created_audience(client, alice, campaign_id, {"all": []})
    url = f"{API}/{campaign_id}/audiences/{audience['id']}"
    assert client.patch(url, json={"name": "B"}, headers=alice["headers"]).status_code == 200
    assert client.delete(url, headers=alice["headers"]).status_code == 204


# -- estimates -------------------------------------------------------------------------------


def test_everyone_means_every_contact_of_the_user_only(client, db_session, alice, bob):
    for index in range(3):
        make_contact(db_session, alice, email=f"a{index}@example.com")
    for index in range(2):
        make_contact(db_session, bob, email=f"b{index}@example.com")
    campaign_id = make_campaign(db_session, alice)
    audience = created_audience(client, alice, campaign_id, {"all": []})
    assert estimate(client, alice, campaign_id, audience["id"]) == 3
    nobody = created_audience(client, alice, campaign_id, {"any": []})
    assert estimate(client, alice, campaign_id, nobody["id"]) == 0


def test_estimate_of_the_issue_example(client, db_session, alice, bob):
    now = datetime.now(UTC)
    source = make_source(db_session, alice)
    bobs_source = make_source(db_session, bob)

    def person(name: str, **fields) -> uuid.UUID:
        return make_contact(db_session, alice, email=f"{name}@example.com", **fields)

    gold = {"tier": "gold", "country": "DE"}
    # Matches everything: gold, email consent, a recent big order, not FR/BE, in source.
    winner = person("winner", attributes=gold, consent_email=True)
    # Listed explicitly instead of being in the source.
    listed = person("listed", attributes={"tier": "gold"}, consent_email=True)
    # Each misses exactly one condition.
    french = person("french", attributes={"tier": "gold", "country": "FR"}, consent_email=True)
    silver = person("silver", attributes={"tier": "silver"}, consent_email=True)
    no_consent = person("noconsent", attributes=gold, consent_email=False)
    small = person("small", attributes=gold, consent_email=True)
    old = person("old", attributes=gold, consent_email=True)
    foreign_event = person("foreign", attributes=gold, consent_email=True)
    outsider = person("outsider", attributes=gold, consent_email=True)

    everyone_known = [winner, french, silver, no_consent, small, old, foreign_event]
    db_session.execute(
        insert(ContactSource),
        [
            {"data_source_id": source, "contact_id": c, "external_id": str(c)}
            for c in everyone_known
        ],
    )

    def order(contact, value, days_ago, source_id=source):
        return {
            "data_source_id": source_id,
            "contact_id": contact,
            "event_type": "order_placed",
            "payload": {"value": value},
            "occurred_at": now - timedelta(days=days_ago),
        }

    db_session.execute(
        insert(DataEvent),
        [
            order(winner, 80, 2),
            order(listed, 50, 29),
            order(french, 90, 1),
            order(silver, 90, 1),
            order(no_consent, 90, 1),
            order(small, 49.99, 1),
            order(small, "80", 1),  # a string is not a number
            order(old, 90, 31),
            order(foreign_event, 90, 1, bobs_source),
            order(outsider, 90, 1),
        ],
    )
    db_session.commit()
    definition = {
        "all": [
            {"field": "attributes.tier", "op": "eq", "value": "gold"},
            {"consent": "email"},
            {
                "event": "order_placed",
                "where": [{"field": "value", "op": "gte", "value": 50}],
                "min_count": 1,
                "within_days": 30,
            },
            {"not": {"field": "attributes.country", "op": "in", "value": ["FR", "BE"]}},
            {"any": [{"source_id": str(source)}, {"contact_ids": [str(listed)]}]},
        ]
    }
    campaign_id = make_campaign(db_session, alice)
    audience = created_audience(client, alice, campaign_id, definition)
    assert estimate(client, alice, campaign_id, audience["id"]) == 2

    # "Did not perform" is the complement among the user's contacts.
    never = created_audience(
        client, alice, campaign_id, {"event": "order_placed", "performed": False}
    )
    assert estimate(client, alice, campaign_id, never["id"]) == 1  # foreign_event
    recent_never = created_audience(
        client,
        alice,
        campaign_id,
        {"event": "order_placed", "within_days": 30, "max_count": 0},
    )
    assert estimate(client, alice, campaign_id, recent_never["id"]) == 2  # old, foreign_event


# -- recipients --------------------------------------------------------------------------------


def test_recipient_counts_apply_consent_address_suppression_and_dedup(
    client, db_session, alice, bob
):
    def person(**fields) -> uuid.UUID:
        return make_contact(db_session, alice, **fields)

    everywhere = {
        "consent_email": True,
        "consent_sms": True,
        "consent_push": True,
        "consent_whatsapp": True,
    }
    both = person(
        email="both@example.com",
        phone="+33612345678",
        whatsapp="+33612345678",
        push_tokens=["tok"],
        attributes={"vip": True, "city": "Paris"},
        **everywhere,
    )
    vip_only = person(email="vip@example.com", attributes={"vip": True}, **everywhere)
    paris_no_consent = person(
        email="paris@example.com",
        phone="+33611111111",
        attributes={"city": "Paris"},
        consent_email=False,
        consent_sms=True,
    )
    suppressed = person(
        email="gone@example.com",
        phone="+33622222222",
        push_tokens=["t1"],
        attributes={"vip": True},
        **everywhere,
    )
    person(email="", attributes={"vip": True}, **everywhere)  # empty address, no tokens
    person(email="outside@example.com", attributes={"vip": False}, **everywhere)
    make_contact(db_session, bob, email="bob-vip@example.com", attributes={"vip": True})
    db_session.add_all(
        [
            Suppression(
                user_id=alice["id"], channel="email", address="GONE@example.com", reason="bounce"
            ),
            Suppression(
                user_id=alice["id"], channel="push", address=str(suppressed), reason="unsubscribe"
            ),
            # Suppressed for another user or another channel: no effect here.
            Suppression(user_id=bob["id"], channel="sms", address="+33622222222", reason="manual"),
            Suppression(
                user_id=alice["id"], channel="whatsapp", address="+33622222222", reason="manual"
            ),
        ]
    )
    campaign_id = make_campaign(db_session, alice)
    db_session.add(CampaignChannel(campaign_id=campaign_id, channel_type="email"))
    db_session.add(CampaignChannel(campaign_id=campaign_id, channel_type="sms"))
    db_session.commit()

    url = f"{API}/{campaign_id}/recipients/count"
    empty = client.get(url, headers=alice["headers"]).get_json()
    assert empty == {
        "total": 0,
        "email": 0,
        "sms": 0,
        "push": 0,
        "whatsapp": 0,
        "channels": {"email": 0, "sms": 0},
    }

    created_audience(
        client, alice, campaign_id, {"field": "attributes.vip", "op": "eq", "value": True}
    )
    created_audience(
        client, alice, campaign_id, {"field": "attributes.city", "op": "eq", "value": "Paris"}
    )
    counts = client.get(url, headers=alice["headers"]).get_json()
    assert counts == {
        "total": 5,  # both (in both audiences, once), vip_only, paris, suppressed, empty
        "email": 2,  # both, vip_only (paris: no consent; gone: suppressed; "": no address)
        "sms": 3,  # both, paris, suppressed (only Bob suppressed that number)
        "push": 1,  # both (suppressed's contact id is suppressed; others have no tokens)
        "whatsapp": 1,  # both
        "channels": {"email": 2, "sms": 3},
    }

    # The same function, composed into the INSERT … SELECT the dispatch engine will run.
    channel_id = db_session.scalar(
        select(CampaignChannel.id).where(CampaignChannel.channel_type == "email")
    )
    recipients = recipients_select(
        db_session, campaign_id, "email", now=datetime.now(UTC)
    ).subquery()
    db_session.execute(
        insert(Delivery).from_select(
            ["campaign_channel_id", "contact_id", "address"],
            select(literal(channel_id), recipients.c.contact_id, recipients.c.address),
        )
    )
    db_session.commit()
    planned = db_session.execute(select(Delivery.contact_id, Delivery.address)).all()
    assert sorted(planned) == sorted([(both, "both@example.com"), (vip_only, "vip@example.com")])
    push = db_session.execute(
        recipients_select(db_session, campaign_id, "push", now=datetime.now(UTC))
    ).all()
    assert [tuple(row) for row in push] == [(both, str(both))]
    assert paris_no_consent not in {row.contact_id for row in planned}


def test_openapi_documents_the_definition_language(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    paths = spec["paths"]
    assert "post" in paths["/api/v1/campaigns/{campaign_id}/audiences/{audience_id}/estimate"]
    assert "get" in paths["/api/v1/campaigns/{campaign_id}/recipients/count"]
    schema = spec["components"]["schemas"]["AudienceArgs"]
    assert "contains" in schema["properties"]["definition"]["description"]
    assert json.dumps(schema["properties"]["definition"]["example"])
    not_editable = paths["/api/v1/campaigns/{campaign_id}/audiences"]["post"]["responses"]["409"]
    assert not_editable["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope")
