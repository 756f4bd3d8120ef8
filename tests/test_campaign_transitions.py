"""The campaign status machine: every (status, action) pair, races, preconditions."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime

from sqlalchemy import select, update

from engine.clock import FixedClock
from engine.models import Audience, Campaign, CampaignChannel
from tests.campaigns_fixtures import API, insert_campaign
from tests.conftest import make_account
from tests.helpers import assert_error

STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
ACTIONS = ("schedule", "unschedule", "launch", "pause", "resume", "cancel")
FUTURE = "2999-01-01T09:30:00+00:00"
EARLIER = datetime(2998, 6, 1, tzinfo=UTC)

# Written out from the issue, not imported from the engine, so the test can disagree.
ALLOWED = {
    ("draft", "schedule"): "scheduled",
    ("scheduled", "unschedule"): "draft",
    ("draft", "launch"): "running",
    ("scheduled", "launch"): "running",
    ("running", "pause"): "paused",
    ("paused", "resume"): "running",
    ("scheduled", "cancel"): "cancelled",
    ("running", "cancel"): "cancelled",
    ("paused", "cancel"): "cancelled",
}


def _post(client, account, campaign_id, action, body=None):
    if action == "schedule" and body is None:
        body = {"scheduled_at": FUTURE}
    return client.post(f"{API}/{campaign_id}/{action}", json=body, headers=account["headers"])


def _stored(db_session, campaign_id) -> Campaign | None:
    db_session.expire_all()
    return db_session.get(Campaign, campaign_id)


def test_every_status_action_pair(client, alice, db_session, subtests):
    tried = 0
    for status in STATUSES:
        for action in ACTIONS:
            with subtests.test(status=status, action=action):
                tried += 1
                campaign = insert_campaign(db_session, alice["id"], status=status)
                db_session.execute(
                    update(Campaign).where(Campaign.id == campaign.id).values(scheduled_at=EARLIER)
                )
                db_session.commit()
                response = _post(client, alice, campaign.id, action)
                stored = _stored(db_session, campaign.id)
                expected = ALLOWED.get((status, action))
                if expected is None:
                    error = assert_error(response, 409, "invalid_transition")
                    assert error["current_status"] == status
                    assert action in error["message"]
                    assert stored.status == status
                    assert stored.scheduled_at == EARLIER
                    assert stored.ended_at is None
                    continue
                assert response.status_code == 200, response.get_json()
                body = response.get_json()
                assert body["status"] == expected == stored.status
                assert body["id"] == str(campaign.id)
                assert [c["channel_type"] for c in body["channels"]] == ["email"]
                assert stored.started_at is None  # the dispatch engine's to set
                if action == "schedule":
                    assert stored.scheduled_at == datetime.fromisoformat(FUTURE)
                elif action == "unschedule":
                    assert stored.scheduled_at is None and body["scheduled_at"] is None
                else:
                    assert stored.scheduled_at == EARLIER
                if action == "cancel":
                    assert stored.ended_at is not None and body["ended_at"] is not None
                else:
                    assert stored.ended_at is None
    assert tried == len(STATUSES) * len(ACTIONS) == 36


def _race(app, account, requests: list[tuple[str, str, dict | None]]):
    """Fire the requests at once from separate clients; returns their responses in order."""
    barrier = threading.Barrier(len(requests))
    results: list = [None] * len(requests)

    def run(index: int, method: str, url: str, body: dict | None) -> None:
        client = app.test_client()
        barrier.wait()
        response = getattr(client, method)(url, json=body, headers=account["headers"])
        results[index] = (response.status_code, response.get_json(silent=True))

    threads = [
        threading.Thread(target=run, args=(index, *request))
        for index, request in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(result is not None for result in results), results
    return results


def test_racing_launches_exactly_one_wins(app, alice, db_session):
    for _round in range(3):
        campaign = insert_campaign(db_session, alice["id"])
        url = f"{API}/{campaign.id}/launch"
        results = _race(app, alice, [("post", url, None)] * 8)
        codes = sorted(code for code, _ in results)
        assert codes == [200] + [409] * 7, results
        for code, body in results:
            if code == 409:
                assert body["error"]["code"] == "invalid_transition"
                assert body["error"]["current_status"] == "running"
        assert _stored(db_session, campaign.id).status == "running"


def test_racing_cancels_exactly_one_wins(app, alice, db_session):
    campaign = insert_campaign(db_session, alice["id"], status="running")
    url = f"{API}/{campaign.id}/cancel"
    results = _race(app, alice, [("post", url, None)] * 6)
    assert sorted(code for code, _ in results) == [200] + [409] * 5, results
    winners = [body for code, body in results if code == 200]
    assert winners[0]["status"] == "cancelled"
    stored = _stored(db_session, campaign.id)
    assert stored.status == "cancelled"
    assert stored.ended_at == datetime.fromisoformat(winners[0]["ended_at"])


def test_delete_racing_launch_never_leaves_both_done(app, alice, db_session):
    for _round in range(3):
        campaign = insert_campaign(db_session, alice["id"])
        url = f"{API}/{campaign.id}"
        (launch_code, launch), (delete_code, deleted) = _race(
            app, alice, [("post", f"{url}/launch", None), ("delete", url, None)]
        )
        stored = _stored(db_session, campaign.id)
        if launch_code == 200:
            assert delete_code == 409, deleted
            assert deleted["error"]["current_status"] == "running"
            assert stored.status == "running"
        else:
            assert (launch_code, delete_code) == (404, 204), (launch, deleted)
            assert stored is None


def test_unverified_users_cannot_schedule_or_launch(client, db_session):
    carol = make_account(client, "carol@example.com", verified=False)
    campaign = insert_campaign(db_session, carol["id"])
    for action in ("schedule", "launch"):
        error = assert_error(_post(client, carol, campaign.id, action), 403, "email_not_verified")
        assert "verify" in error["message"]
    assert _stored(db_session, campaign.id).status == "draft"
    # Stopping is never held back by verification.
    running = insert_campaign(db_session, carol["id"], status="running")
    assert _post(client, carol, running.id, "cancel").status_code == 200


def test_schedule_and_launch_need_a_channel_and_an_audience(client, alice, db_session):
    empty = insert_campaign(db_session, alice["id"], channels=(), audiences=0)
    no_audience = insert_campaign(db_session, alice["id"], channels=("sms",), audiences=0)
    no_channel = insert_campaign(db_session, alice["id"], channels=(), audiences=2)
    for action in ("schedule", "launch"):
        error = assert_error(
            _post(client, alice, empty.id, action), 422, "validation_error", "channels", "audiences"
        )
        assert error["fields"]["channels"] == ["at least one channel is required"]
        error = assert_error(_post(client, alice, no_audience.id, action), 422, "validation_error")
        assert set(error["fields"]) == {"audiences"}
        error = assert_error(_post(client, alice, no_channel.id, action), 422, "validation_error")
        assert set(error["fields"]) == {"channels"}
    statuses = db_session.scalars(select(Campaign.status)).all()
    assert statuses == ["draft"] * 3
    # The status is judged first: a running campaign answers 409 even without content.
    db_session.execute(update(Campaign).where(Campaign.id == empty.id).values(status="running"))
    db_session.commit()
    error = assert_error(_post(client, alice, empty.id, "launch"), 409, "invalid_transition")
    assert error["current_status"] == "running"


def test_a_campaign_whose_content_was_removed_cannot_launch(client, alice, db_session):
    campaign = insert_campaign(db_session, alice["id"], status="scheduled")
    db_session.query(CampaignChannel).delete()
    db_session.query(Audience).delete()
    db_session.commit()
    assert_error(_post(client, alice, campaign.id, "launch"), 422, "validation_error", "channels")
    assert _stored(db_session, campaign.id).status == "scheduled"


def test_scheduled_at_must_be_aware_and_in_the_future(client, alice, db_session, subtests):
    campaign = insert_campaign(db_session, alice["id"])
    cases = [
        ({"scheduled_at": "2999-01-01T09:30:00"}, "scheduled_at"),  # naive
        ({"scheduled_at": "2001-01-01T09:30:00+00:00"}, "scheduled_at"),  # past
        ({"scheduled_at": "next tuesday"}, "scheduled_at"),
        ({}, "scheduled_at"),
        ({"scheduled_at": FUTURE, "timezone": "UTC"}, "timezone"),
    ]
    for body, field in cases:
        with subtests.test(body=body):
            response = _post(client, alice, campaign.id, "schedule", body)
            error = assert_error(response, 422, "validation_error")
            assert list(error["fields"]) == [field]
    assert _stored(db_session, campaign.id).status == "draft"
    ok = _post(
        client, alice, campaign.id, "schedule", {"scheduled_at": "2999-01-01T10:30:00+01:00"}
    )
    assert ok.get_json()["scheduled_at"] == FUTURE


def test_the_future_is_judged_by_the_injected_clock(settings, alice, db_session):
    from api import create_app

    now = datetime(3000, 1, 1, tzinfo=UTC)
    client = create_app(replace(settings), clock=FixedClock(now)).test_client()
    campaign = insert_campaign(db_session, alice["id"])
    # In the future by the wall clock, but the app's clock says it is the year 3000.
    error = assert_error(
        _post(client, alice, campaign.id, "schedule"), 422, "validation_error", "scheduled_at"
    )
    assert error["fields"]["scheduled_at"] == ["must be in the future"]
    assert_error(
        _post(client, alice, campaign.id, "schedule", {"scheduled_at": now.isoformat()}),
        422,
        "validation_error",
        "scheduled_at",
    )
    later = "3000-01-01T00:00:01+00:00"
    response = _post(client, alice, campaign.id, "schedule", {"scheduled_at": later})
    assert response.status_code == 200 and response.get_json()["scheduled_at"] == later
    cancelled = _post(client, alice, campaign.id, "cancel").get_json()
    assert cancelled["ended_at"] == now.isoformat()
