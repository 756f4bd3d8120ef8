"""The per-message log, stats and retry-failed, over the real app and PostgreSQL.

Deliveries are written straight through a session, as the dispatch engine would have
left them, so each test knows exactly what the endpoints must answer.
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from engine.models import Campaign, CampaignChannel, Delivery
from tests.campaigns_fixtures import API, insert_campaign, insert_contact
from tests.helpers import assert_error

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def channel_of(db_session, campaign: Campaign, channel_type: str) -> CampaignChannel:
    return db_session.scalar(
        select(CampaignChannel).where(
            CampaignChannel.campaign_id == campaign.id,
            CampaignChannel.channel_type == channel_type,
        )
    )


def add_deliveries(db_session, channel: CampaignChannel, user_id, rows: list[dict]) -> list[int]:
    """One contact and one delivery per dict (the dict sets the delivery's columns)."""
    ids = []
    for index, values in enumerate(rows):
        contact = insert_contact(
            db_session, user_id, email=f"c{uuid.uuid4().hex[:8]}-{index}@example.com"
        )
        delivery = Delivery(
            campaign_channel_id=channel.id,
            contact_id=contact.id,
            address=values.pop("address", contact.email),
            **values,
        )
        db_session.add(delivery)
        db_session.flush()
        ids.append(delivery.id)
    db_session.commit()
    return ids


@pytest.fixture
def campaign(db_session, alice) -> Campaign:
    return insert_campaign(db_session, alice["id"], status="running", channels=("email", "sms"))


# -- the per-message log ---------------------------------------------------------------


def test_deliveries_list_every_field_newest_first(client, alice, db_session, campaign):
    email = channel_of(db_session, campaign, "email")
    sms = channel_of(db_session, campaign, "sms")
    sent_id, failed_id = add_deliveries(
        db_session,
        email,
        alice["id"],
        [
            {
                "status": "sent",
                "attempts": 1,
                "provider_message_id": "<m1@herald>",
                "sent_at": T0,
                "delivered_at": T0 + timedelta(seconds=5),
                "opened_at": T0 + timedelta(minutes=1),
                "clicked_at": T0 + timedelta(minutes=2),
            },
            {
                "status": "failed",
                "attempts": 3,
                "last_error": "550 mailbox unavailable",
                "failed_at": T0,
            },
        ],
    )
    (queued_id,) = add_deliveries(
        db_session,
        sms,
        alice["id"],
        [
            {
                "status": "queued",
                "attempts": 1,
                "address": "+15550001111",
                "last_error": "429 too many requests",
                "next_attempt_at": T0 + timedelta(seconds=30),
            }
        ],
    )

    response = client.get(f"{API}/{campaign.id}/deliveries", headers=alice["headers"])

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["next_cursor"] is None
    assert [item["id"] for item in body["items"]] == [queued_id, failed_id, sent_id]
    queued, failed, sent = body["items"]
    stored = db_session.get(Delivery, sent_id)
    assert sent == {
        "id": sent_id,
        "channel": "email",
        "contact_id": str(stored.contact_id),
        "address": stored.address,
        "status": "sent",
        "attempts": 1,
        "last_error": None,
        "provider_message_id": "<m1@herald>",
        "next_attempt_at": None,
        "sent_at": "2025-03-01T09:00:00+00:00",
        "delivered_at": "2025-03-01T09:00:05+00:00",
        "opened_at": "2025-03-01T09:01:00+00:00",
        "clicked_at": "2025-03-01T09:02:00+00:00",
        "failed_at": None,
        "created_at": stored.created_at.isoformat(),
    }
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert failed["last_error"] == "550 mailbox unavailable"
    assert failed["failed_at"] == "2025-03-01T09:00:00+00:00"
    assert queued["channel"] == "sms" and queued["address"] == "+15550001111"
    assert queued["next_attempt_at"] == "2025-03-01T09:00:30+00:00"
    assert queued["last_error"] == "429 too many requests"


def test_deliveries_filter_by_status_and_channel(client, alice, db_session, campaign):
    email = channel_of(db_session, campaign, "email")
    sms = channel_of(db_session, campaign, "sms")
    email_failed = add_deliveries(
        db_session, email, alice["id"], [{"status": "failed"}, {"status": "failed"}]
    )
    add_deliveries(db_session, email, alice["id"], [{"status": "sent", "sent_at": T0}])
    sms_failed = add_deliveries(
        db_session, sms, alice["id"], [{"status": "failed", "address": "+15550002222"}]
    )

    def ids(query: str) -> list[int]:
        response = client.get(f"{API}/{campaign.id}/deliveries?{query}", headers=alice["headers"])
        assert response.status_code == 200, response.get_json()
        return [item["id"] for item in response.get_json()["items"]]

    assert ids("status=failed") == sorted(email_failed + sms_failed, reverse=True)
    assert ids("status=failed&channel=email") == sorted(email_failed, reverse=True)
    assert ids("channel=sms") == sms_failed
    assert ids("status=queued") == []


def test_deliveries_export_as_csv_streams_the_whole_filtered_log(
    client, alice, bob, db_session, campaign
):
    email = channel_of(db_session, campaign, "email")
    sms = channel_of(db_session, campaign, "sms")
    sent = add_deliveries(
        db_session, email, alice["id"], [{"status": "sent", "sent_at": T0} for _ in range(3)]
    )
    (failed,) = add_deliveries(
        db_session,
        email,
        alice["id"],
        [{"status": "failed", "last_error": '550 "no", such user,\nreally', "attempts": 2}],
    )
    (hostile,) = add_deliveries(
        db_session, sms, alice["id"], [{"status": "failed", "address": "=HYPERLINK(1)"}]
    )
    url = f"{API}/{campaign.id}/deliveries?format=csv"

    response = client.get(url, headers=alice["headers"])
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    assert response.is_streamed
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [int(r["id"]) for r in rows] == [*sent, failed, hostile]  # oldest first, all
    by_id = {int(r["id"]): r for r in rows}
    assert by_id[failed]["last_error"] == '550 "no", such user,\nreally'  # quoted intact
    assert by_id[failed]["attempts"] == "2"
    assert by_id[sent[0]]["sent_at"] == T0.isoformat()
    assert by_id[hostile]["address"] == "'=HYPERLINK(1)"  # never evaluated as a formula
    assert by_id[hostile]["channel"] == "sms"

    filtered = client.get(f"{url}&status=failed&channel=email", headers=alice["headers"])
    assert [int(r["id"]) for r in csv.DictReader(io.StringIO(filtered.get_data(as_text=True)))] == [
        failed
    ]
    assert_error(client.get(url, headers=bob["headers"]), 404, "not_found")
    assert_error(
        client.get(f"{url[:-3]}xml", headers=alice["headers"]), 422, "validation_error", "format"
    )


def test_deliveries_csv_export_reads_in_chunks(db_session, alice, campaign):
    from engine.services.deliveries import deliveries_select, iter_deliveries

    email = channel_of(db_session, campaign, "email")
    created = add_deliveries(db_session, email, alice["id"], [{} for _ in range(7)])
    stmt = deliveries_select(db_session, alice["id"], campaign.id)
    chunks = list(iter_deliveries(db_session, stmt, chunk_size=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [row.id for chunk in chunks for row in chunk] == created


def test_deliveries_pages_with_a_cursor_without_repeats_or_gaps(
    client, alice, db_session, campaign
):
    email = channel_of(db_session, campaign, "email")
    created = add_deliveries(db_session, email, alice["id"], [{} for _ in range(5)])
    seen, cursor, pages = [], None, 0
    while True:
        url = f"{API}/{campaign.id}/deliveries?limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=alice["headers"]).get_json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(created, reverse=True)
    assert pages == 3


def test_deliveries_only_lists_this_campaigns_rows(client, alice, db_session, campaign):
    other = insert_campaign(db_session, alice["id"], status="running", name="Other")
    add_deliveries(db_session, channel_of(db_session, other, "email"), alice["id"], [{}])
    mine = add_deliveries(db_session, channel_of(db_session, campaign, "email"), alice["id"], [{}])
    body = client.get(f"{API}/{campaign.id}/deliveries", headers=alice["headers"]).get_json()
    assert [item["id"] for item in body["items"]] == mine


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=lost", "status"),
        ("channel=fax", "channel"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=WzBd", "cursor"),  # [0]: well-formed, but no id is below 1
        ("cursor=WyJ4Il0", "cursor"),  # ["x"]
    ],
)
def test_deliveries_query_validation_names_the_field(client, alice, campaign, query, field):
    response = client.get(f"{API}/{campaign.id}/deliveries?{query}", headers=alice["headers"])
    assert_error(response, 422, "validation_error", field)


# -- stats --------------------------------------------------------------------------------


def test_stats_count_by_status_and_events_next_to_the_counters(client, alice, db_session, campaign):
    push = CampaignChannel(
        campaign_id=campaign.id, channel_type="push", config={"title": "t", "body": "b"}
    )
    db_session.add(push)
    email = channel_of(db_session, campaign, "email")
    sms = channel_of(db_session, campaign, "sms")
    add_deliveries(
        db_session,
        email,
        alice["id"],
        [
            {"status": "sent", "sent_at": T0},
            {"status": "sent", "sent_at": T0, "delivered_at": T0},
            {"status": "sent", "sent_at": T0, "delivered_at": T0, "opened_at": T0},
            {
                "status": "sent",
                "sent_at": T0,
                "delivered_at": T0,
                "opened_at": T0,
                "clicked_at": T0,
            },
            {"status": "failed", "failed_at": T0, "attempts": 3},
            {"status": "queued"},
            {"status": "sending"},
            {"status": "suppressed"},
        ],
    )
    add_deliveries(
        db_session,
        sms,
        alice["id"],
        [
            {"status": "sent", "sent_at": T0, "address": "+15550000001"},
            {"status": "cancelled", "address": "+15550000002"},
        ],
    )
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == email.id)
        .values(status="planned", sent_count=4, delivered_count=3, opened_count=2, clicked_count=1)
    )
    # A counter that disagrees with the log: stats must report both sides as they are.
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == sms.id)
        .values(status="done", sent_count=2)
    )
    db_session.execute(
        update(Campaign)
        .where(Campaign.id == campaign.id)
        .values(status="paused", status_reason="error rate 0.5 over 0.2", started_at=T0)
    )
    db_session.commit()

    response = client.get(f"{API}/{campaign.id}/stats", headers=alice["headers"])

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["campaign_id"] == str(campaign.id)
    assert body["status"] == "paused"
    assert body["status_reason"] == "error rate 0.5 over 0.2"
    assert body["started_at"] == "2025-03-01T09:00:00+00:00"
    assert body["ended_at"] is None
    assert body["channels"] == [
        {
            "channel_id": str(email.id),
            "channel": "email",
            "status": "planned",
            "total": 8,
            "by_status": {
                "queued": 1,
                "sending": 1,
                "sent": 4,
                "failed": 1,
                "cancelled": 0,
                "suppressed": 1,
            },
            "counters": {"sent": 4, "delivered": 3, "opened": 2, "clicked": 1},
            "from_deliveries": {"sent": 4, "delivered": 3, "opened": 2, "clicked": 1},
        },
        {
            "channel_id": str(push.id),
            "channel": "push",
            "status": "pending",
            "total": 0,
            "by_status": dict.fromkeys(
                ("queued", "sending", "sent", "failed", "cancelled", "suppressed"), 0
            ),
            "counters": {"sent": 0, "delivered": 0, "opened": 0, "clicked": 0},
            "from_deliveries": {"sent": 0, "delivered": 0, "opened": 0, "clicked": 0},
        },
        {
            "channel_id": str(sms.id),
            "channel": "sms",
            "status": "done",
            "total": 2,
            "by_status": {
                "queued": 0,
                "sending": 0,
                "sent": 1,
                "failed": 0,
                "cancelled": 1,
                "suppressed": 0,
            },
            "counters": {"sent": 2, "delivered": 0, "opened": 0, "clicked": 0},
            "from_deliveries": {"sent": 1, "delivered": 0, "opened": 0, "clicked": 0},
        },
    ]


def test_stats_of_a_campaign_without_channels(client, alice, db_session):
    campaign = insert_campaign(db_session, alice["id"], channels=())
    body = client.get(f"{API}/{campaign.id}/stats", headers=alice["headers"]).get_json()
    assert body["status"] == "draft" and body["channels"] == []


# -- retry-failed -------------------------------------------------------------------------


def _retry(client, account, campaign_id):
    return client.post(f"{API}/{campaign_id}/retry-failed", headers=account["headers"])


@pytest.mark.parametrize("status", ["completed", "paused"])
def test_retry_failed_requeues_only_failed_rows_and_runs_again(
    client, alice, db_session, campaign, status
):
    email = channel_of(db_session, campaign, "email")
    sms = channel_of(db_session, campaign, "sms")
    failed = add_deliveries(
        db_session,
        email,
        alice["id"],
        [
            {
                "status": "failed",
                "attempts": 3,
                "last_error": "timeout",
                "failed_at": T0,
                "dispatched_at": T0,
                "next_attempt_at": T0,
            },
            {"status": "failed", "attempts": 1, "last_error": "550 no such user", "failed_at": T0},
        ],
    )
    untouched = add_deliveries(
        db_session,
        email,
        alice["id"],
        [
            {"status": "sent", "attempts": 1, "sent_at": T0, "dispatched_at": T0},
            {"status": "suppressed"},
            {"status": "cancelled"},
        ],
    )
    add_deliveries(
        db_session,
        sms,
        alice["id"],
        [{"status": "sent", "sent_at": T0, "address": "+15550000003"}],
    )
    # Another campaign's failure stays failed.
    other = insert_campaign(db_session, alice["id"], status=status, name="Other")
    (other_failed,) = add_deliveries(
        db_session, channel_of(db_session, other, "email"), alice["id"], [{"status": "failed"}]
    )
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.campaign_id == campaign.id)
        .values(status="done")
    )
    db_session.execute(
        update(Campaign)
        .where(Campaign.id == campaign.id)
        .values(status=status, ended_at=T0, status_reason="error threshold")
    )
    db_session.commit()
    before = {
        d.id: (d.status, d.attempts, d.sent_at, d.dispatched_at)
        for d in db_session.scalars(select(Delivery).where(Delivery.id.in_(untouched)))
    }

    response = _retry(client, alice, campaign.id)

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"requeued": 2, "status": "running"}
    db_session.expire_all()
    for delivery_id, error in zip(failed, ["timeout", "550 no such user"], strict=True):
        row = db_session.get(Delivery, delivery_id)
        assert (row.status, row.attempts, row.last_error) == ("queued", 0, error)
        assert row.failed_at is None and row.next_attempt_at is None
        assert row.dispatched_at is None and row.lease_expires_at is None
    after = {
        d.id: (d.status, d.attempts, d.sent_at, d.dispatched_at)
        for d in db_session.scalars(select(Delivery).where(Delivery.id.in_(untouched)))
    }
    assert after == before
    assert db_session.get(Delivery, other_failed).status == "failed"
    stored = db_session.get(Campaign, campaign.id)
    assert (stored.status, stored.ended_at, stored.status_reason) == ("running", None, None)
    # The email channel got rows back, so it is no longer done; sms had nothing to retry.
    assert db_session.get(CampaignChannel, email.id).status == "planned"
    assert db_session.get(CampaignChannel, sms.id).status == "done"
    assert db_session.get(Campaign, other.id).status == status


def test_retry_failed_with_nothing_failed_changes_nothing(client, alice, db_session, campaign):
    email = channel_of(db_session, campaign, "email")
    add_deliveries(db_session, email, alice["id"], [{"status": "sent", "sent_at": T0}])
    db_session.execute(update(CampaignChannel).values(status="done"))
    db_session.execute(
        update(Campaign).where(Campaign.id == campaign.id).values(status="completed", ended_at=T0)
    )
    db_session.commit()

    response = _retry(client, alice, campaign.id)

    assert response.status_code == 200
    assert response.get_json() == {"requeued": 0, "status": "completed"}
    db_session.expire_all()
    stored = db_session.get(Campaign, campaign.id)
    assert stored.status == "completed" and stored.ended_at == T0
    assert db_session.get(CampaignChannel, email.id).status == "done"


@pytest.mark.parametrize("status", ["draft", "scheduled", "running", "cancelled"])
def test_retry_failed_is_refused_from_other_statuses(client, alice, db_session, campaign, status):
    email = channel_of(db_session, campaign, "email")
    (failed,) = add_deliveries(db_session, email, alice["id"], [{"status": "failed"}])
    db_session.execute(update(Campaign).where(Campaign.id == campaign.id).values(status=status))
    db_session.commit()

    error = assert_error(_retry(client, alice, campaign.id), 409, "invalid_transition")

    assert error["current_status"] == status
    db_session.expire_all()
    assert db_session.get(Delivery, failed).status == "failed"
    assert db_session.get(Campaign, campaign.id).status == status


# -- tenancy and documentation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", "deliveries"), ("GET", "stats"), ("POST", "retry-failed")],
)
def test_another_users_campaign_is_not_found(
    client, alice, bob, db_session, campaign, method, suffix
):
    email = channel_of(db_session, campaign, "email")
    (failed,) = add_deliveries(db_session, email, alice["id"], [{"status": "failed"}])
    db_session.execute(
        update(Campaign).where(Campaign.id == campaign.id).values(status="completed")
    )
    db_session.commit()

    theirs = client.open(f"{API}/{campaign.id}/{suffix}", method=method, headers=bob["headers"])
    missing = client.open(f"{API}/{uuid.uuid4()}/{suffix}", method=method, headers=bob["headers"])

    assert_error(theirs, 404, "not_found")
    assert_error(missing, 404, "not_found")
    assert theirs.get_json() == missing.get_json()
    db_session.expire_all()
    assert db_session.get(Delivery, failed).status == "failed"
    assert db_session.get(Campaign, campaign.id).status == "completed"


def test_routes_are_documented_and_need_a_token(client, campaign):
    spec = client.get("/api/v1/openapi.json").get_json()
    base = "/api/v1/campaigns/{campaign_id}"
    assert "get" in spec["paths"][f"{base}/deliveries"]
    assert "get" in spec["paths"][f"{base}/stats"]
    assert "post" in spec["paths"][f"{base}/retry-failed"]
    params = {p["name"] for p in spec["paths"][f"{base}/deliveries"]["get"]["parameters"]}
    assert {"status", "channel", "limit", "cursor"} <= params
    for method, suffix in [("GET", "deliveries"), ("GET", "stats"), ("POST", "retry-failed")]:
        response = client.open(f"{API}/{campaign.id}/{suffix}", method=method)
        assert_error(response, 401, "unauthorized")
