"""Campaign and channel endpoints through the real app and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import func, select, update

from engine.campaigns.channel_config import WHATSAPP_SESSION_WARNING
from engine.models import Audience, Campaign, CampaignChannel
from tests.campaigns_fixtures import (
    API,
    EMAIL_CONFIG,
    PUSH_CONFIG,
    SMS_CONFIG,
    VALID_CONFIGS,
    WHATSAPP_TEMPLATE_CONFIG,
    add_channel,
    create_campaign,
    insert_audience,
    insert_campaign,
    insert_contact,
    insert_conversation,
    set_status,
)
from tests.helpers import assert_error

DEFAULT_CONFIG = {"max_attempts": 3, "error_threshold": {"rate": 0.2, "min_attempts": 100}}


# -- create, read --------------------------------------------------------------------


def test_create_fills_config_defaults_and_answers_a_draft(client, alice, db_session):
    response = client.post(
        API, json={"name": "Spring sale", "description": "April"}, headers=alice["headers"]
    )
    assert response.status_code == 201
    body = response.get_json()
    assert body["name"] == "Spring sale"
    assert body["description"] == "April"
    assert body["status"] == "draft"
    assert body["config"] == DEFAULT_CONFIG
    assert body["channels"] == []
    assert body["conversation_id"] is None
    assert body["scheduled_at"] is None and body["started_at"] is None
    assert body["ended_at"] is None
    assert body["created_at"].endswith("+00:00")
    stored = db_session.get(Campaign, uuid.UUID(body["id"]))
    assert stored.user_id == alice["id"]
    assert stored.config == DEFAULT_CONFIG


def test_config_is_stored_with_the_missing_parts_defaulted(client, alice, db_session):
    config = {"rate_per_second": 12.5, "max_attempts": 10, "error_threshold": {"rate": 0.5}}
    body = create_campaign(client, alice, config=config)
    expected = {
        "rate_per_second": 12.5,
        "max_attempts": 10,
        "error_threshold": {"rate": 0.5, "min_attempts": 100},
    }
    assert body["config"] == expected
    assert db_session.get(Campaign, uuid.UUID(body["id"])).config == expected


CONFIG_ERRORS = [
    ({"foo": 1}, "config.foo"),
    ({"rate_per_second": 0}, "config.rate_per_second"),
    ({"rate_per_second": -3}, "config.rate_per_second"),
    ({"rate_per_second": "10"}, "config.rate_per_second"),
    ({"rate_per_second": True}, "config.rate_per_second"),
    ({"max_attempts": 0}, "config.max_attempts"),
    ({"max_attempts": 11}, "config.max_attempts"),
    ({"max_attempts": 2.5}, "config.max_attempts"),
    ({"max_attempts": None}, "config.max_attempts"),
    ({"error_threshold": {"rate": 1.5}}, "config.error_threshold.rate"),
    ({"error_threshold": {"rate": -0.1}}, "config.error_threshold.rate"),
    ({"error_threshold": {"min_attempts": 0}}, "config.error_threshold.min_attempts"),
    ({"error_threshold": {"min_attempts": 1.5}}, "config.error_threshold.min_attempts"),
    ({"error_threshold": {"ratio": 0.1}}, "config.error_threshold.ratio"),
    ({"error_threshold": 0.2}, "config.error_threshold"),
]


def test_config_errors_name_the_key(client, alice, db_session, subtests):
    for config, field in CONFIG_ERRORS:
        with subtests.test(config=config):
            response = client.post(
                API, json={"name": "x", "config": config}, headers=alice["headers"]
            )
            error = assert_error(response, 422, "validation_error", field)
            assert list(error["fields"]) == [field]
    assert db_session.scalar(select(func.count()).select_from(Campaign)) == 0


def test_config_must_be_an_object_and_all_problems_are_reported_at_once(client, alice):
    assert_error(
        client.post(API, json={"name": "x", "config": [1]}, headers=alice["headers"]),
        422,
        "validation_error",
        "config",
    )
    bad = {"max_attempts": 99, "rate_per_second": 0, "typo": True}
    error = assert_error(
        client.post(API, json={"name": "x", "config": bad}, headers=alice["headers"]),
        422,
        "validation_error",
    )
    assert set(error["fields"]) == {
        "config.max_attempts",
        "config.rate_per_second",
        "config.typo",
    }


CAMPAIGN_FIELD_ERRORS = [
    ({}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 256}, "name"),
    ({"name": "x", "status": "running"}, "status"),
    ({"name": "x", "started_at": "2030-01-01T00:00:00+00:00"}, "started_at"),
    ({"name": "x", "ended_at": "2030-01-01T00:00:00+00:00"}, "ended_at"),
    ({"name": "x", "conversation_id": "not-a-uuid"}, "conversation_id"),
]


def test_campaign_fields_are_validated(client, alice, subtests):
    for body, field in CAMPAIGN_FIELD_ERRORS:
        with subtests.test(body=body):
            response = client.post(API, json=body, headers=alice["headers"])
            assert_error(response, 422, "validation_error", field)


def test_conversation_must_be_one_of_the_users_own(client, alice, bob, db_session):
    mine = insert_conversation(db_session, alice["id"])
    theirs = insert_conversation(db_session, bob["id"])
    body = create_campaign(client, alice, conversation_id=str(mine.id))
    assert body["conversation_id"] == str(mine.id)

    foreign = client.post(
        API, json={"name": "x", "conversation_id": str(theirs.id)}, headers=alice["headers"]
    )
    missing = client.post(
        API, json={"name": "x", "conversation_id": str(uuid.uuid4())}, headers=alice["headers"]
    )
    error = assert_error(foreign, 422, "validation_error", "conversation_id")
    assert error["fields"]["conversation_id"] == ["not found"]
    assert foreign.get_json() == missing.get_json()
    assert db_session.scalar(select(func.count()).select_from(Campaign)) == 1


def test_get_includes_channels_with_their_counters(client, alice, db_session):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "sms")
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == uuid.UUID(channel["id"]))
        .values(sent_count=7, delivered_count=5, opened_count=3, clicked_count=1)
    )
    db_session.commit()
    body = client.get(f"{API}/{campaign['id']}", headers=alice["headers"]).get_json()
    assert len(body["channels"]) == 1
    got = body["channels"][0]
    assert got["id"] == channel["id"]
    assert got["channel_type"] == "sms"
    assert got["status"] == "pending"
    assert (got["sent_count"], got["delivered_count"], got["opened_count"]) == (7, 5, 3)
    assert got["clicked_count"] == 1
    assert got["config"] == SMS_CONFIG


def test_list_pages_newest_first_filters_by_status_and_is_per_user(client, alice, bob, db_session):
    ids = [create_campaign(client, alice, name=f"c{i}")["id"] for i in range(3)]
    create_campaign(client, bob, name="bob's")
    add_channel(client, alice, ids[0], "push")
    set_status(db_session, ids[1], "paused")

    first = client.get(f"{API}?limit=2", headers=alice["headers"]).get_json()
    assert [c["name"] for c in first["items"]] == ["c2", "c1"]
    assert first["next_cursor"]
    second = client.get(
        f"{API}?limit=2&cursor={first['next_cursor']}", headers=alice["headers"]
    ).get_json()
    assert [c["name"] for c in second["items"]] == ["c0"]
    assert second["next_cursor"] is None
    assert second["items"][0]["channels"][0]["channel_type"] == "push"
    assert second["items"][0]["channels"][0]["sent_count"] == 0

    paused = client.get(f"{API}?status=paused", headers=alice["headers"]).get_json()
    assert [c["id"] for c in paused["items"]] == [ids[1]]
    drafts = client.get(f"{API}?status=draft", headers=alice["headers"]).get_json()
    assert sorted(c["id"] for c in drafts["items"]) == sorted([ids[0], ids[2]])
    assert_error(
        client.get(f"{API}?status=sleeping", headers=alice["headers"]),
        422,
        "validation_error",
        "status",
    )
    assert_error(
        client.get(f"{API}?cursor=garbage", headers=alice["headers"]),
        422,
        "validation_error",
        "cursor",
    )


def test_routes_need_a_token(client):
    assert_error(client.get(API), 401, "unauthorized")
    assert_error(client.post(f"{API}/{uuid.uuid4()}/launch"), 401, "unauthorized")


# -- update, delete ------------------------------------------------------------------


def test_patch_updates_fields_and_replaces_config(client, alice, db_session):
    conversation = insert_conversation(db_session, alice["id"])
    campaign = create_campaign(
        client, alice, config={"max_attempts": 5}, conversation_id=str(conversation.id)
    )
    response = client.patch(
        f"{API}/{campaign['id']}",
        json={"name": "Renamed", "description": None, "config": {"rate_per_second": 2}},
        headers=alice["headers"],
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["name"] == "Renamed"
    assert body["description"] is None
    assert body["config"] == {"rate_per_second": 2, **DEFAULT_CONFIG}
    assert body["conversation_id"] == str(conversation.id)
    unlinked = client.patch(
        f"{API}/{campaign['id']}", json={"conversation_id": None}, headers=alice["headers"]
    )
    assert unlinked.get_json()["conversation_id"] is None
    assert unlinked.get_json()["name"] == "Renamed"
    stored = db_session.get(Campaign, uuid.UUID(campaign["id"]))
    db_session.refresh(stored)
    assert stored.name == "Renamed" and stored.conversation_id is None


PATCH_ERRORS = [
    ({"config": {"max_attempts": 0}}, "config.max_attempts"),
    ({"status": "running"}, "status"),
    ({"started_at": "2030-01-01T00:00:00+00:00"}, "started_at"),
    ({"name": None}, "name"),
    ({"conversation_id": str(uuid.uuid4())}, "conversation_id"),
]


def test_patch_validation_names_the_field(client, alice, db_session, subtests):
    campaign = create_campaign(client, alice)
    for body, field in PATCH_ERRORS:
        with subtests.test(body=body):
            response = client.patch(f"{API}/{campaign['id']}", json=body, headers=alice["headers"])
            assert_error(response, 422, "validation_error", field)
    stored = db_session.get(Campaign, uuid.UUID(campaign["id"]))
    assert (stored.name, stored.status, stored.started_at) == ("Spring sale", "draft", None)


def test_content_is_editable_before_running_and_while_paused(client, alice, db_session, subtests):
    for status in ("draft", "scheduled", "paused"):
        with subtests.test(status=status):
            campaign = create_campaign(client, alice)
            set_status(db_session, campaign["id"], status)
            response = client.patch(
                f"{API}/{campaign['id']}", json={"name": "ok"}, headers=alice["headers"]
            )
            assert response.status_code == 200 and response.get_json()["name"] == "ok"
            assert response.get_json()["status"] == status
            channel = add_channel(client, alice, campaign["id"], "sms")
            url = f"{API}/{campaign['id']}/channels/{channel['id']}"
            patched = client.patch(url, json={"config": {"body": "new"}}, headers=alice["headers"])
            assert patched.status_code == 200
            assert patched.get_json()["config"] == {"body": "new"}
            assert client.delete(url, headers=alice["headers"]).status_code == 204


def test_content_edits_are_refused_while_sending_or_finished(client, alice, db_session, subtests):
    for status in ("running", "completed", "cancelled"):
        with subtests.test(status=status):
            campaign = create_campaign(client, alice)
            channel = add_channel(client, alice, campaign["id"], "sms")
            set_status(db_session, campaign["id"], status)
            base = f"{API}/{campaign['id']}"
            attempts = [
                client.patch(base, json={"name": "nope"}, headers=alice["headers"]),
                client.post(
                    f"{base}/channels",
                    json={"channel_type": "push", "config": PUSH_CONFIG},
                    headers=alice["headers"],
                ),
                client.patch(
                    f"{base}/channels/{channel['id']}",
                    json={"config": {"body": "x"}},
                    headers=alice["headers"],
                ),
                client.delete(f"{base}/channels/{channel['id']}", headers=alice["headers"]),
            ]
            for response in attempts:
                error = assert_error(response, 409, "campaign_not_editable")
                assert error["current_status"] == status
            stored = db_session.get(Campaign, uuid.UUID(campaign["id"]))
            assert stored.name == "Spring sale"
            channels = db_session.scalars(
                select(CampaignChannel).where(CampaignChannel.campaign_id == stored.id)
            ).all()
            assert [(c.channel_type, c.config) for c in channels] == [("sms", SMS_CONFIG)]


def test_delete_removes_a_draft_with_its_channels_and_audiences(client, alice, db_session):
    campaign = create_campaign(client, alice)
    add_channel(client, alice, campaign["id"], "email")
    insert_audience(db_session, campaign["id"])
    response = client.delete(f"{API}/{campaign['id']}", headers=alice["headers"])
    assert response.status_code == 204
    assert db_session.scalar(select(func.count()).select_from(Campaign)) == 0
    assert db_session.scalar(select(func.count()).select_from(CampaignChannel)) == 0
    assert db_session.scalar(select(func.count()).select_from(Audience)) == 0
    assert_error(client.get(f"{API}/{campaign['id']}", headers=alice["headers"]), 404, "not_found")


def test_only_drafts_can_be_deleted(client, alice, db_session, subtests):
    for status in ("scheduled", "running", "paused", "completed", "cancelled"):
        with subtests.test(status=status):
            campaign = insert_campaign(db_session, alice["id"], status=status)
            response = client.delete(f"{API}/{campaign.id}", headers=alice["headers"])
            error = assert_error(response, 409, "invalid_transition")
            assert error["current_status"] == status
            assert db_session.get(Campaign, campaign.id) is not None
    assert db_session.scalar(select(func.count()).select_from(Campaign)) == 5


# -- clone ---------------------------------------------------------------------------


def test_clone_copies_config_channels_and_audiences_as_a_fresh_draft(client, alice, db_session):
    conversation = insert_conversation(db_session, alice["id"])
    source = create_campaign(
        client,
        alice,
        name="Spring sale",
        description="April",
        config={"max_attempts": 7},
        conversation_id=str(conversation.id),
    )
    add_channel(client, alice, source["id"], "email")
    add_channel(client, alice, source["id"], "whatsapp")
    insert_audience(db_session, source["id"], "Gold")
    insert_audience(db_session, source["id"], "Everyone", {"all": []})
    db_session.execute(
        update(CampaignChannel).values(sent_count=10, delivered_count=9, status="done")
    )
    db_session.commit()
    set_status(db_session, source["id"], "completed")

    response = client.post(f"{API}/{source['id']}/clone", headers=alice["headers"])
    assert response.status_code == 201, response.get_json()
    clone = response.get_json()
    assert clone["id"] != source["id"]
    assert clone["name"] == "Spring sale (copy)"
    assert clone["description"] == "April"
    assert clone["status"] == "draft"
    assert clone["config"]["max_attempts"] == 7
    assert clone["conversation_id"] == str(conversation.id)
    channels = {c["channel_type"]: c for c in clone["channels"]}
    assert set(channels) == {"email", "whatsapp"}
    assert channels["email"]["config"] == EMAIL_CONFIG
    assert channels["whatsapp"]["config"] == WHATSAPP_TEMPLATE_CONFIG
    for channel in channels.values():
        assert channel["status"] == "pending"
        assert channel["sent_count"] == channel["delivered_count"] == 0
    audiences = db_session.scalars(
        select(Audience).where(Audience.campaign_id == uuid.UUID(clone["id"]))
    ).all()
    assert sorted((a.name, a.definition) for a in audiences) == [
        ("Everyone", {"all": []}),
        ("Gold", {"all": [{"field": "attributes.tier", "op": "eq", "value": "gold"}]}),
    ]
    # The source is untouched.
    source_row = db_session.get(Campaign, uuid.UUID(source["id"]))
    db_session.refresh(source_row)
    assert source_row.status == "completed"
    assert db_session.scalar(select(func.count()).select_from(Audience)) == 4


def test_clone_of_a_maximal_name_stays_within_the_column(client, alice):
    source = create_campaign(client, alice, name="n" * 255)
    clone = client.post(f"{API}/{source['id']}/clone", headers=alice["headers"]).get_json()
    assert len(clone["name"]) == 255
    assert clone["name"].endswith(" (copy)")


# -- channels ------------------------------------------------------------------------


def test_each_channel_type_is_created_with_its_config(client, alice, db_session, subtests):
    campaign = create_campaign(client, alice)
    for channel_type, config in VALID_CONFIGS.items():
        with subtests.test(channel_type=channel_type):
            response = client.post(
                f"{API}/{campaign['id']}/channels",
                json={"channel_type": channel_type, "config": config},
                headers=alice["headers"],
            )
            assert response.status_code == 201, response.get_json()
            body = response.get_json()
            assert body["channel_type"] == channel_type
            assert body["campaign_id"] == campaign["id"]
            assert body["config"] == config
            assert body["status"] == "pending"
            assert body["sent_count"] == body["delivered_count"] == 0
            assert body["opened_count"] == body["clicked_count"] == 0
            assert body["warnings"] == []
            stored = db_session.get(CampaignChannel, uuid.UUID(body["id"]))
            assert stored.config == config
    listed = client.get(f"{API}/{campaign['id']}", headers=alice["headers"]).get_json()
    assert sorted(c["channel_type"] for c in listed["channels"]) == sorted(VALID_CONFIGS)


def test_one_channel_per_type(client, alice, db_session):
    campaign = create_campaign(client, alice)
    add_channel(client, alice, campaign["id"], "email")
    again = client.post(
        f"{API}/{campaign['id']}/channels",
        json={"channel_type": "email", "config": EMAIL_CONFIG},
        headers=alice["headers"],
    )
    assert_error(again, 409, "duplicate_channel", "channel_type")
    assert db_session.scalar(select(func.count()).select_from(CampaignChannel)) == 1


def test_whatsapp_free_form_body_carries_the_24_hour_warning(client, alice):
    campaign = create_campaign(client, alice)
    created = add_channel(
        client, alice, campaign["id"], "whatsapp", body="Hi {{ contact.first_name }}"
    )
    assert created["warnings"] == [WHATSAPP_SESSION_WARNING]
    assert "24 hours" in created["warnings"][0]
    fetched = client.get(
        f"{API}/{campaign['id']}/channels/{created['id']}", headers=alice["headers"]
    ).get_json()
    assert fetched["warnings"] == [WHATSAPP_SESSION_WARNING]
    switched = client.patch(
        f"{API}/{campaign['id']}/channels/{created['id']}",
        json={"config": WHATSAPP_TEMPLATE_CONFIG},
        headers=alice["headers"],
    ).get_json()
    assert switched["warnings"] == []
    assert switched["config"] == WHATSAPP_TEMPLATE_CONFIG


def _email(**changes):
    config = dict(EMAIL_CONFIG)
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    return config


CHANNEL_CONFIG_ERRORS = [
    ("email", _email(subject=...), {"config.subject"}),
    ("email", _email(subject="  "), {"config.subject"}),
    ("email", _email(html=..., text=...), {"config.html", "config.text"}),
    ("email", _email(html="  ", text=...), {"config.html", "config.text"}),
    ("email", _email(from_email="not-an-email"), {"config.from_email"}),
    ("email", _email(reply_to="nope@"), {"config.reply_to"}),
    ("email", _email(from_name="a\nBcc: x@y.com"), {"config.from_name"}),
    ("email", _email(html=5), {"config.html"}),
    ("email", _email(cc="x@example.com"), {"config.cc"}),
    ("sms", {}, {"config.body"}),
    ("sms", {"body": "x", "sender": "+12"}, {"config.sender"}),
    ("sms", {"body": "x", "sender": "TooLongSenderId"}, {"config.sender"}),
    ("sms", {"body": "x", "media": []}, {"config.media"}),
    ("push", {"body": "b"}, {"config.title"}),
    ("push", {"title": "t"}, {"config.body"}),
    ("push", {**PUSH_CONFIG, "data": {"n": 1}}, {"config.data.n"}),
    ("push", {**PUSH_CONFIG, "data": ["x"]}, {"config.data"}),
    ("push", {**PUSH_CONFIG, "url": "javascript:alert(1)"}, {"config.url"}),
    ("push", {**PUSH_CONFIG, "image_url": "ftp://x.example.com/a.png"}, {"config.image_url"}),
    ("whatsapp", {}, {"config.template"}),
    ("whatsapp", {**WHATSAPP_TEMPLATE_CONFIG, "body": "hi"}, {"config.body"}),
    ("whatsapp", {"template": {"language": "en"}}, {"config.template.name"}),
    ("whatsapp", {"template": {"name": "x"}}, {"config.template.language"}),
    (
        "whatsapp",
        {"template": {"name": "x", "language": "en", "parameters": "a"}},
        {"config.template.parameters"},
    ),
    (
        "whatsapp",
        {"template": {"name": "x", "language": "en", "parameters": ["ok", 3]}},
        {"config.template.parameters[1]"},
    ),
    (
        "whatsapp",
        {"template": {"name": "x", "language": "en", "namespace": "y"}},
        {"config.template.namespace"},
    ),
    (
        "whatsapp",
        {"template": {"name": "Bad Name", "language": "en"}},
        {"config.template.name"},
    ),
]


def test_channel_config_errors_name_the_field(client, alice, db_session, subtests):
    campaign = create_campaign(client, alice)
    for channel_type, config, fields in CHANNEL_CONFIG_ERRORS:
        with subtests.test(channel_type=channel_type, config=config):
            response = client.post(
                f"{API}/{campaign['id']}/channels",
                json={"channel_type": channel_type, "config": config},
                headers=alice["headers"],
            )
            error = assert_error(response, 422, "validation_error")
            assert set(error["fields"]) == fields
    assert db_session.scalar(select(func.count()).select_from(CampaignChannel)) == 0


CHANNEL_BODY_ERRORS = [
    ({"channel_type": "fax", "config": {}}, "channel_type"),
    ({"channel_type": "sms"}, "config"),
    ({"channel_type": "sms", "config": "hi"}, "config"),
    ({"channel_type": "sms", "config": SMS_CONFIG, "sent_count": 5}, "sent_count"),
    ({"channel_type": "sms", "config": SMS_CONFIG, "status": "done"}, "status"),
]


def test_channel_body_is_validated(client, alice, subtests):
    campaign = create_campaign(client, alice)
    url = f"{API}/{campaign['id']}/channels"
    for body, field in CHANNEL_BODY_ERRORS:
        with subtests.test(body=body):
            response = client.post(url, json=body, headers=alice["headers"])
            assert_error(response, 422, "validation_error", field)


def test_channel_patch_replaces_config_and_keeps_type_and_counters_read_only(
    client, alice, db_session
):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "email")
    url = f"{API}/{campaign['id']}/channels/{channel['id']}"
    new_config = {"subject": "New", "text": "Plain only"}
    response = client.patch(url, json={"config": new_config}, headers=alice["headers"])
    assert response.status_code == 200
    assert response.get_json()["config"] == new_config
    assert db_session.get(CampaignChannel, uuid.UUID(channel["id"])).config == new_config
    for body, field in (
        ({"channel_type": "sms", "config": SMS_CONFIG}, "channel_type"),
        ({"config": new_config, "sent_count": 3}, "sent_count"),
        ({}, "config"),
        ({"config": {"subject": "x"}}, "config.html"),
    ):
        assert_error(
            client.patch(url, json=body, headers=alice["headers"]), 422, "validation_error", field
        )


def test_channels_list_get_and_delete(client, alice, db_session):
    campaign = create_campaign(client, alice)
    email = add_channel(client, alice, campaign["id"], "email")
    sms = add_channel(client, alice, campaign["id"], "sms")
    base = f"{API}/{campaign['id']}/channels"
    listed = client.get(base, headers=alice["headers"]).get_json()
    assert [c["id"] for c in listed["items"]] == [sms["id"], email["id"]]
    assert listed["next_cursor"] is None
    page = client.get(f"{base}?limit=1", headers=alice["headers"]).get_json()
    assert [c["id"] for c in page["items"]] == [sms["id"]] and page["next_cursor"]
    got = client.get(f"{base}/{email['id']}", headers=alice["headers"]).get_json()
    assert got == email
    assert client.delete(f"{base}/{email['id']}", headers=alice["headers"]).status_code == 204
    assert_error(client.get(f"{base}/{email['id']}", headers=alice["headers"]), 404, "not_found")
    remaining = db_session.scalars(select(CampaignChannel.channel_type)).all()
    assert remaining == ["sms"]


def test_from_email_domain_must_be_allowed_when_the_deployment_says_so(settings, alice):
    from api import create_app

    restricted = create_app(replace(settings, email_allowed_from_domains=("example.com",)))
    client = restricted.test_client()
    campaign = create_campaign(client, alice)
    url = f"{API}/{campaign['id']}/channels"
    foreign = {**EMAIL_CONFIG, "from_email": "news@elsewhere.org"}
    error = assert_error(
        client.post(
            url, json={"channel_type": "email", "config": foreign}, headers=alice["headers"]
        ),
        422,
        "validation_error",
        "config.from_email",
    )
    assert "example.com" in error["fields"]["config.from_email"][0]
    allowed = {**EMAIL_CONFIG, "from_email": "News@Example.COM"}
    ok = client.post(
        url, json={"channel_type": "email", "config": allowed}, headers=alice["headers"]
    )
    assert ok.status_code == 201, ok.get_json()


def test_any_from_domain_is_accepted_when_no_list_is_set(client, alice, settings):
    assert settings.email_allowed_from_domains == ()
    campaign = create_campaign(client, alice)
    add_channel(client, alice, campaign["id"], "email", **{**EMAIL_CONFIG, "from_email": "a@b.io"})


# -- preview -------------------------------------------------------------------------


def test_preview_renders_every_template_for_one_contact(client, alice, db_session):
    campaign = create_campaign(client, alice, name="Spring <sale>")
    channel = add_channel(client, alice, campaign["id"], "email")
    contact = insert_contact(
        db_session,
        alice["id"],
        email="ada@example.com",
        first_name="Ada <3",
        attributes={"tier": "gold"},
    )
    response = client.post(
        f"{API}/{campaign['id']}/channels/{channel['id']}/preview",
        json={"contact_id": str(contact.id)},
        headers=alice["headers"],
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "rendered": {
            "subject": "Hello Ada <3",
            "html": "<p>Hi Ada &lt;3, tier gold</p>",
            "text": "Hi Ada <3",
            "from_email": "news@example.com",
            "from_name": "Example News",
            "reply_to": "help@example.com",
        }
    }


def test_preview_of_whatsapp_template_parameters(client, alice, db_session):
    campaign = create_campaign(client, alice, name="Spring")
    channel = add_channel(client, alice, campaign["id"], "whatsapp")
    contact = insert_contact(db_session, alice["id"], first_name="Lin")
    response = client.post(
        f"{API}/{campaign['id']}/channels/{channel['id']}/preview",
        json={"contact_id": str(contact.id)},
        headers=alice["headers"],
    )
    assert response.get_json()["rendered"] == {
        "template": {"name": "spring_offer", "language": "en_US", "parameters": ["Lin", "Spring"]}
    }


def test_preview_of_a_contact_missing_data_renders_empty_not_none(client, alice, db_session):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "push")
    contact = insert_contact(db_session, alice["id"], email="x@example.com")
    rendered = client.post(
        f"{API}/{campaign['id']}/channels/{channel['id']}/preview",
        json={"contact_id": str(contact.id)},
        headers=alice["headers"],
    ).get_json()["rendered"]
    assert rendered["title"] == "Hi "
    assert rendered["body"] == "New for "


def test_preview_answers_422_naming_the_template_that_fails_for_this_contact(
    client, alice, db_session
):
    campaign = create_campaign(client, alice)
    channel = add_channel(
        client, alice, campaign["id"], "sms", body="{{ contact.first_name.upper() }}"
    )
    nameless = insert_contact(db_session, alice["id"], email="n@example.com")
    named = insert_contact(db_session, alice["id"], email="m@example.com", first_name="mo")
    url = f"{API}/{campaign['id']}/channels/{channel['id']}/preview"
    error = assert_error(
        client.post(url, json={"contact_id": str(nameless.id)}, headers=alice["headers"]),
        422,
        "validation_error",
        "config.body",
    )
    assert "upper" in error["fields"]["config.body"][0]
    ok = client.post(url, json={"contact_id": str(named.id)}, headers=alice["headers"])
    assert ok.get_json()["rendered"]["body"] == "MO"


def test_preview_of_another_users_contact_is_404(client, alice, bob, db_session):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "sms")
    theirs = insert_contact(db_session, bob["id"], email="b@example.com", first_name="Bo")
    url = f"{API}/{campaign['id']}/channels/{channel['id']}/preview"
    foreign = client.post(url, json={"contact_id": str(theirs.id)}, headers=alice["headers"])
    missing = client.post(url, json={"contact_id": str(uuid.uuid4())}, headers=alice["headers"])
    assert_error(foreign, 404, "not_found")
    assert foreign.get_json() == missing.get_json()
    assert_error(
        client.post(url, json={}, headers=alice["headers"]), 422, "validation_error", "contact_id"
    )


# -- tenant isolation ----------------------------------------------------------------


def _routes_with_ids(campaign_id, channel_id, contact_id):
    campaign = f"{API}/{campaign_id}"
    channel = f"{campaign}/channels/{channel_id}"
    future = "2999-01-01T00:00:00+00:00"
    return [
        ("get", campaign, None),
        ("patch", campaign, {"name": "stolen"}),
        ("delete", campaign, None),
        ("post", f"{campaign}/clone", None),
        ("post", f"{campaign}/schedule", {"scheduled_at": future}),
        ("post", f"{campaign}/unschedule", None),
        ("post", f"{campaign}/launch", None),
        ("post", f"{campaign}/pause", None),
        ("post", f"{campaign}/resume", None),
        ("post", f"{campaign}/cancel", None),
        ("post", f"{campaign}/channels", {"channel_type": "push", "config": PUSH_CONFIG}),
        ("get", f"{campaign}/channels", None),
        ("get", channel, None),
        ("patch", channel, {"config": {"body": "stolen"}}),
        ("delete", channel, None),
        ("post", f"{channel}/preview", {"contact_id": str(contact_id)}),
    ]


def test_every_route_with_an_id_answers_404_to_another_tenant(client, alice, bob, db_session):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "sms")
    insert_audience(db_session, campaign["id"])
    bobs_contact = insert_contact(db_session, bob["id"], first_name="Bo")
    routes = _routes_with_ids(campaign["id"], channel["id"], bobs_contact.id)
    for method, url, body in routes:
        response = getattr(client, method)(url, json=body, headers=bob["headers"])
        assert_error(response, 404, "not_found")
        missing_url = url.replace(campaign["id"], str(uuid.uuid4()))
        missing = getattr(client, method)(missing_url, json=body, headers=bob["headers"])
        assert response.get_json() == missing.get_json(), url
    stored = db_session.get(Campaign, uuid.UUID(campaign["id"]))
    assert (stored.name, stored.status) == ("Spring sale", "draft")
    assert db_session.scalar(select(func.count()).select_from(Campaign)) == 1
    assert db_session.get(CampaignChannel, uuid.UUID(channel["id"])).config == SMS_CONFIG


def test_a_channel_id_of_another_campaign_answers_404(client, alice, db_session):
    first = create_campaign(client, alice, name="first")
    second = create_campaign(client, alice, name="second")
    channel = add_channel(client, alice, first["id"], "sms")
    contact = insert_contact(db_session, alice["id"], first_name="A")
    channel_routes = [
        route
        for route in _routes_with_ids(second["id"], channel["id"], contact.id)
        if "/channels/" in route[1]
    ]
    assert len(channel_routes) == 4
    for method, url, body in channel_routes:
        assert_error(
            getattr(client, method)(url, json=body, headers=alice["headers"]), 404, "not_found"
        )
    assert db_session.get(CampaignChannel, uuid.UUID(channel["id"])).config == SMS_CONFIG


def test_malformed_ids_answer_404(client, alice):
    assert_error(client.get(f"{API}/not-a-uuid", headers=alice["headers"]), 404, "not_found")
    campaign = create_campaign(client, alice)
    assert_error(
        client.get(f"{API}/{campaign['id']}/channels/42", headers=alice["headers"]),
        404,
        "not_found",
    )


def test_openapi_documents_every_campaign_route_with_bearer_auth(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    expected = {
        "/api/v1/campaigns": {"get", "post"},
        "/api/v1/campaigns/{campaign_id}": {"get", "patch", "delete"},
        "/api/v1/campaigns/{campaign_id}/clone": {"post"},
        "/api/v1/campaigns/{campaign_id}/channels": {"get", "post"},
        "/api/v1/campaigns/{campaign_id}/channels/{channel_id}": {"get", "patch", "delete"},
        "/api/v1/campaigns/{campaign_id}/channels/{channel_id}/preview": {"post"},
    }
    for action in ("schedule", "unschedule", "launch", "pause", "resume", "cancel"):
        expected[f"/api/v1/campaigns/{{campaign_id}}/{action}"] = {"post"}
    for path, methods in expected.items():
        assert path in spec["paths"], path
        operations = spec["paths"][path]
        assert methods <= set(operations), (path, set(operations))
        for method in methods:
            assert operations[method]["security"] == [{"bearerAuth": []}], (path, method)
    launch = spec["paths"]["/api/v1/campaigns/{campaign_id}/launch"]["post"]
    assert {"200", "403", "404", "409"} <= set(launch["responses"])
    schedule_body = spec["paths"]["/api/v1/campaigns/{campaign_id}/schedule"]["post"]
    assert schedule_body["requestBody"]["required"] is True


def test_scheduled_at_in_responses_is_iso_with_offset(client, alice, db_session):
    campaign = insert_campaign(db_session, alice["id"])
    when = "2999-05-01T12:00:00+02:00"
    body = client.post(
        f"{API}/{campaign.id}/schedule", json={"scheduled_at": when}, headers=alice["headers"]
    ).get_json()
    assert body["scheduled_at"] == "2999-05-01T10:00:00+00:00"
    stored = db_session.get(Campaign, campaign.id)
    db_session.refresh(stored)
    assert stored.scheduled_at.utcoffset() == timedelta(0)
