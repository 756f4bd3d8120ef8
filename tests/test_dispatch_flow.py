"""The dispatch orchestration against real PostgreSQL: promotion, planning, completion
and reconciliation, with time from a FixedClock (no sleeps, no worker).

Rows the scenarios need in a given state (sent, sending with a lease, waiting for a
retry) are written directly; the sending step itself is tested in its own files.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update

from engine.clock import FixedClock
from engine.dispatch.completion import complete_finished
from engine.dispatch.planning import batch_ranges, channels_to_plan, plan_channel
from engine.dispatch.promotion import promote_due
from engine.dispatch.reconciliation import DISPATCH_GRACE, reconcile
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression, User
from engine.services.contacts import delete_contact
from tests.campaigns_fixtures import insert_campaign
from tests.dispatch_helpers import (
    assert_counters_match,
    counter_mismatches,
    insert_contacts,
    record_sent,
)

T0 = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


def _user(db_session, email: str) -> uuid.UUID:
    # Written directly: registering through the API hashes a password, which costs more
    # than any of these scenarios.
    user = User(email=email, password_hash="not-a-real-hash", is_verified=True)
    db_session.add(user)
    db_session.commit()
    return user.id


@pytest.fixture
def alice(db_session) -> dict:
    return {"id": _user(db_session, "alice@example.com")}


@pytest.fixture
def bob(db_session) -> dict:
    return {"id": _user(db_session, "bob@example.com")}


@pytest.fixture
def factory(app):
    from api.extensions import db

    return db.factory


def _campaign(db_session, user_id, *, status="running", channels=("email",), **values):
    campaign = insert_campaign(db_session, user_id, status=status, channels=channels)
    if values:
        db_session.execute(update(Campaign).where(Campaign.id == campaign.id).values(**values))
        db_session.commit()
    return campaign.id


def _channels(db_session, campaign_id) -> dict[str, CampaignChannel]:
    db_session.expire_all()
    rows = db_session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == campaign_id)
    )
    return {row.channel_type: row for row in rows}


def _campaign_row(db_session, campaign_id) -> Campaign:
    db_session.expire_all()
    return db_session.get(Campaign, campaign_id)


def _deliveries(db_session, channel_id) -> list[Delivery]:
    db_session.expire_all()
    return list(
        db_session.scalars(
            select(Delivery).where(Delivery.campaign_channel_id == channel_id).order_by(Delivery.id)
        )
    )


def _plan_all(db_session, campaign_id, now, **kwargs):
    batches = []
    for channel_id in channels_to_plan(db_session, campaign_id):
        batches += plan_channel(db_session, channel_id, now, **kwargs)
    db_session.commit()
    return batches


# -- promotion ---------------------------------------------------------------------------


def test_promotion_moves_only_due_scheduled_campaigns(db_session, alice, clock):
    now = clock.now()
    due = _campaign(db_session, alice["id"], status="scheduled", scheduled_at=now - timedelta(1))
    exactly_now = _campaign(db_session, alice["id"], status="scheduled", scheduled_at=now)
    later = _campaign(
        db_session, alice["id"], status="scheduled", scheduled_at=now + timedelta(seconds=1)
    )
    draft = _campaign(db_session, alice["id"], status="draft", scheduled_at=now - timedelta(1))
    paused = _campaign(db_session, alice["id"], status="paused", scheduled_at=now - timedelta(1))

    promoted = promote_due(db_session, now)
    db_session.commit()

    assert sorted(promoted) == sorted([due, exactly_now])
    for campaign_id, status in [
        (due, "running"),
        (exactly_now, "running"),
        (later, "scheduled"),
        (draft, "draft"),
        (paused, "paused"),
    ]:
        assert _campaign_row(db_session, campaign_id).status == status
    assert _campaign_row(db_session, due).started_at == now
    assert _campaign_row(db_session, later).started_at is None
    # The beat's next tick at the same instant finds nothing left to promote.
    assert promote_due(db_session, now) == []
    # Once the clock passes its time, the later one goes too.
    clock.set(now + timedelta(seconds=1))
    assert promote_due(db_session, clock.now()) == [later]


def _waiting_on_a_lock(db_session, pid: int) -> bool:
    # pg_stat_activity is a snapshot per transaction: look at it from a fresh one.
    db_session.rollback()
    return bool(
        db_session.scalar(
            text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": pid},
        )
    )


def _start_and_wait_for_its_lock(db_session, pid: int, target, failure: str) -> threading.Thread:
    """Run `target` (which uses the backend `pid`) in a thread, and return once that
    backend is waiting on a lock, so the scenario can release it."""
    racer = threading.Thread(target=target)
    racer.start()
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while not _waiting_on_a_lock(db_session, pid):
        assert datetime.now(UTC) < deadline, failure
    return racer


def test_two_racing_promotions_promote_each_campaign_once(db_session, factory, alice, clock):
    """Beat A's UPDATE holds the rows while beat B's identical UPDATE waits on them; once
    A commits, B re-checks status = 'scheduled' and promotes nothing."""
    now = clock.now()
    ids = {
        _campaign(db_session, alice["id"], status="scheduled", scheduled_at=now) for _ in range(5)
    }
    first, second = factory(), factory()
    results: dict[str, list] = {}
    try:
        second_pid = second.scalar(text("SELECT pg_backend_pid()"))
        results["first"] = promote_due(first, now)  # uncommitted: rows locked
        racer = _start_and_wait_for_its_lock(
            db_session,
            second_pid,
            lambda: results.setdefault("second", promote_due(second, now)),
            "the second promotion never reached the lock",
        )
        first.commit()
        racer.join(10)
        second.commit()
    finally:
        first.close()
        second.close()
    assert set(results["first"]) == ids
    assert results["second"] == []


# -- planning ----------------------------------------------------------------------------


def test_planning_inserts_exactly_the_recipients(db_session, alice, bob, clock):
    now = clock.now()
    user = alice["id"]
    reachable = [
        Contact(user_id=user, email=f"r{n}@example.com", first_name=f"R{n}", consent_email=True)
        for n in range(4)
    ]
    unreachable = [
        Contact(user_id=user, email="noconsent@example.com", consent_email=False),
        Contact(user_id=user, email=None, phone="+15550000001", consent_email=True),
        Contact(user_id=user, email="Suppressed@Example.com", consent_email=True),
        Contact(user_id=bob["id"], email="bobs@example.com", consent_email=True),
    ]
    db_session.add_all(reachable + unreachable)
    db_session.add(
        Suppression(
            user_id=user, channel="email", address="suppressed@example.com", reason="manual"
        )
    )
    db_session.commit()
    campaign_id = _campaign(db_session, user, channels=("email",))
    channel = _channels(db_session, campaign_id)["email"]

    batches = _plan_all(db_session, campaign_id, now)

    rows = _deliveries(db_session, channel.id)
    assert sorted((r.contact_id, r.address) for r in rows) == sorted(
        (c.id, c.email) for c in reachable
    )
    assert {(r.status, r.dispatched_at, r.attempts) for r in rows} == {("queued", now, 0)}
    assert [(b.channel_id, b.channel_type, b.first_id, b.last_id) for b in batches] == [
        (channel.id, "email", rows[0].id, rows[-1].id)
    ]
    assert _channels(db_session, campaign_id)["email"].status == "planned"
    assert _campaign_row(db_session, campaign_id).started_at == now

    # Planning again: the channel is planned, so nothing is inserted or batched.
    assert _plan_all(db_session, campaign_id, now + timedelta(seconds=5)) == []
    assert plan_channel(db_session, channel.id, now + timedelta(seconds=5)) == []
    # Even forced back to pending, a re-run adds no second delivery for anyone.
    db_session.execute(
        update(CampaignChannel).where(CampaignChannel.id == channel.id).values(status="pending")
    )
    db_session.commit()
    assert _plan_all(db_session, campaign_id, now + timedelta(seconds=9)) == []
    assert len(_deliveries(db_session, channel.id)) == len(reachable)
    assert _channels(db_session, campaign_id)["email"].status == "planned"


def test_planning_cuts_every_row_into_batches_of_at_most_the_batch_size(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 1234)
    campaign_id = _campaign(db_session, alice["id"], channels=("email", "sms"))
    channels = _channels(db_session, campaign_id)

    batches = _plan_all(db_session, campaign_id, clock.now(), batch_size=100)

    for kind, channel in channels.items():
        ids = [row.id for row in _deliveries(db_session, channel.id)]
        assert len(ids) == 1234
        mine = [b for b in batches if b.channel_id == channel.id]
        assert {b.channel_type for b in mine} == {kind}
        assert len(mine) == 13
        covered = [[i for i in ids if b.first_id <= i <= b.last_id] for b in mine]
        assert all(1 <= len(chunk) <= 100 for chunk in covered)
        assert sorted(i for chunk in covered for i in chunk) == ids  # each row once
        assert _channels(db_session, campaign_id)[kind].status == "planned"


def test_first_planning_cuts_the_same_ranges_as_the_batcher(db_session, alice, bob, clock):
    """A channel's first planning inserts and cuts in one statement (no ON CONFLICT, the
    ranges from RETURNING); its ranges are exactly what the batcher finds afterwards,
    even with another channel's rows in between, and every row is in one range."""
    insert_contacts(db_session, alice["id"], 1234)
    insert_contacts(db_session, bob["id"], 300, prefix="b")
    mine = _campaign(db_session, alice["id"], channels=("email",))
    other = _campaign(db_session, bob["id"], channels=("sms",))
    email = _channels(db_session, mine)["email"].id
    now = clock.now()

    batches = plan_channel(db_session, email, now, batch_size=100)
    _plan_all(db_session, other, now)  # bob's rows follow; alice's ids stay one block
    db_session.commit()

    again = batch_ranges(
        db_session,
        [Delivery.campaign_channel_id == email, Delivery.dispatched_at == now],
        batch_size=100,
    )
    assert batches == again
    assert [b.first_id for b in batches] == sorted(b.first_id for b in batches)
    ids = [row.id for row in _deliveries(db_session, email)]
    covered = sorted(i for b in batches for i in ids if b.first_id <= i <= b.last_id)
    assert covered == ids and len(ids) == 1234
    contacts = [row.contact_id for row in _deliveries(db_session, email)]
    assert contacts == sorted(contacts)  # inserted in contact order, as the docstring says


def test_planning_skips_campaigns_that_are_not_running(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 3)
    for status in ("draft", "scheduled", "paused", "cancelled", "completed"):
        campaign_id = _campaign(db_session, alice["id"], status=status)
        channel = _channels(db_session, campaign_id)["email"]
        assert channels_to_plan(db_session, campaign_id) == []
        assert plan_channel(db_session, channel.id, clock.now()) == []
        db_session.commit()
        assert _channels(db_session, campaign_id)["email"].status == "pending"
        assert _deliveries(db_session, channel.id) == []


def test_a_second_planner_skips_a_channel_being_planned(db_session, factory, alice, clock):
    """The planner locks its channel until commit; a duplicate plan task does not wait
    behind a long insert, and once the first commits there is nothing left to plan."""
    insert_contacts(db_session, alice["id"], 20)
    campaign_id = _campaign(db_session, alice["id"])
    channel_id = _channels(db_session, campaign_id)["email"].id
    first, second = factory(), factory()
    try:
        assert len(plan_channel(first, channel_id, clock.now())) == 1
        assert plan_channel(second, channel_id, clock.now()) == []
        second.rollback()
        # While the first planner is uncommitted, the channel still reads pending.
        assert _channels(db_session, campaign_id)["email"].status == "pending"
        first.commit()
        assert plan_channel(second, channel_id, clock.now()) == []
    finally:
        first.close()
        second.close()
    assert len(_deliveries(db_session, channel_id)) == 20


def _three_contacts_one_to_erase(db_session, user_id) -> tuple[uuid.UUID, uuid.UUID]:
    """(the contact to erase, the email channel of a running campaign reaching all 3)."""
    insert_contacts(db_session, user_id, 3)
    erased = db_session.scalars(select(Contact.id).order_by(Contact.email)).first()
    campaign_id = _campaign(db_session, user_id)
    return erased, _channels(db_session, campaign_id)["email"].id


def test_an_erasure_waits_for_a_planner_and_then_redacts_what_it_planned(
    db_session, factory, alice, clock
):
    """deliveries.contact_id has no foreign key (migration 0008): erasure itself must see
    the rows a planner is about to commit for the contact it erases."""
    erased, channel_id = _three_contacts_one_to_erase(db_session, alice["id"])
    planner, eraser = factory(), factory()
    try:
        eraser_pid = eraser.scalar(text("SELECT pg_backend_pid()"))
        assert len(plan_channel(planner, channel_id, clock.now())) == 1  # uncommitted

        def erase() -> None:
            delete_contact(eraser, alice["id"], erased)
            eraser.commit()

        racer = _start_and_wait_for_its_lock(
            db_session, eraser_pid, erase, "the erasure never waited for the planner"
        )
        planner.commit()
        racer.join(10)
        assert not racer.is_alive()
    finally:
        planner.close()
        eraser.close()
    rows = _deliveries(db_session, channel_id)
    assert len(rows) == 3
    assert erased not in {row.contact_id for row in rows}
    assert sorted((row.contact_id is None, row.address is None, row.status) for row in rows) == [
        (False, False, "queued"),
        (False, False, "queued"),
        (True, True, "cancelled"),
    ]


def test_a_planner_skips_a_channel_while_an_erasure_is_uncommitted(
    db_session, factory, alice, clock
):
    erased, channel_id = _three_contacts_one_to_erase(db_session, alice["id"])
    planner, eraser = factory(), factory()
    try:
        delete_contact(eraser, alice["id"], erased)  # uncommitted: the channel share-locked
        assert plan_channel(planner, channel_id, clock.now()) == []
        planner.rollback()
        eraser.commit()
        assert len(plan_channel(planner, channel_id, clock.now())) == 1
        planner.commit()
    finally:
        planner.close()
        eraser.close()
    rows = _deliveries(db_session, channel_id)
    assert len(rows) == 2 and erased not in {row.contact_id for row in rows}


def test_a_planner_that_dies_leaves_the_channel_pending_and_empty(db_session, factory, alice):
    insert_contacts(db_session, alice["id"], 5)
    campaign_id = _campaign(db_session, alice["id"])
    channel_id = _channels(db_session, campaign_id)["email"].id
    doomed = factory()
    plan_channel(doomed, channel_id, T0)
    doomed.rollback()  # what a killed worker's connection amounts to
    doomed.close()
    assert _channels(db_session, campaign_id)["email"].status == "pending"
    assert _deliveries(db_session, channel_id) == []
    # ...so it cannot look finished, and reconciliation plans it again.
    assert complete_finished(db_session, T0) == []
    assert reconcile(db_session, T0).campaigns_to_plan == [campaign_id]


# -- completion --------------------------------------------------------------------------


def test_completion_waits_for_every_channel_and_every_row(db_session, alice, clock):
    now = clock.now()
    insert_contacts(db_session, alice["id"], 3)
    campaign_id = _campaign(db_session, alice["id"], channels=("email", "sms"))
    channels = _channels(db_session, campaign_id)
    # Only email is planned: sms still pending must keep the campaign running.
    plan_channel(db_session, channels["email"].id, now)
    db_session.commit()
    email_rows = _deliveries(db_session, channels["email"].id)
    record_sent(db_session, [r.id for r in email_rows], now)

    assert complete_finished(db_session, now) == []
    db_session.commit()
    assert _channels(db_session, campaign_id)["email"].status == "done"
    assert _channels(db_session, campaign_id)["sms"].status == "pending"

    plan_channel(db_session, channels["sms"].id, now)
    db_session.commit()
    sms_rows = _deliveries(db_session, channels["sms"].id)
    # One sms row in flight, one still queued: not finished.
    db_session.execute(
        update(Delivery)
        .where(Delivery.id == sms_rows[0].id)
        .values(status="sending", lease_expires_at=now + timedelta(minutes=5))
    )
    record_sent(db_session, [sms_rows[1].id], now)
    assert complete_finished(db_session, now) == []
    db_session.commit()
    record_sent(db_session, [sms_rows[0].id], now)
    assert complete_finished(db_session, now) == []
    db_session.commit()
    assert _channels(db_session, campaign_id)["sms"].status == "planned"

    later = now + timedelta(minutes=1)
    record_sent(db_session, [sms_rows[2].id], later)
    assert complete_finished(db_session, later) == [campaign_id]
    db_session.commit()
    campaign = _campaign_row(db_session, campaign_id)
    assert (campaign.status, campaign.ended_at) == ("completed", later)
    assert {c.status for c in _channels(db_session, campaign_id).values()} == {"done"}
    assert complete_finished(db_session, later) == []  # completes once
    assert_counters_match(db_session)


def test_failed_and_suppressed_rows_count_as_finished(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 2)
    campaign_id = _campaign(db_session, alice["id"])
    _plan_all(db_session, campaign_id, clock.now())
    rows = _deliveries(db_session, _channels(db_session, campaign_id)["email"].id)
    db_session.execute(update(Delivery).where(Delivery.id == rows[0].id).values(status="failed"))
    db_session.execute(
        update(Delivery).where(Delivery.id == rows[1].id).values(status="suppressed")
    )
    db_session.commit()
    assert complete_finished(db_session, clock.now()) == [campaign_id]


def test_an_audience_reaching_nobody_completes_once_planned(db_session, alice, clock):
    campaign_id = _campaign(db_session, alice["id"], channels=("email", "push"))
    assert complete_finished(db_session, clock.now()) == []  # not planned yet
    assert _plan_all(db_session, campaign_id, clock.now()) == []
    assert complete_finished(db_session, clock.now()) == [campaign_id]


def test_requeued_rows_reopen_a_done_channel(db_session, alice, clock):
    """retry-failed puts failed rows back to queued on a campaign running again."""
    insert_contacts(db_session, alice["id"], 2)
    campaign_id = _campaign(db_session, alice["id"])
    _plan_all(db_session, campaign_id, clock.now())
    channel_id = _channels(db_session, campaign_id)["email"].id
    db_session.execute(update(Delivery).values(status="failed", dispatched_at=None))
    db_session.commit()
    assert complete_finished(db_session, clock.now()) == [campaign_id]
    db_session.commit()
    db_session.execute(update(Delivery).values(status="queued"))
    db_session.execute(update(Campaign).where(Campaign.id == campaign_id).values(status="running"))
    db_session.commit()

    result = reconcile(db_session, clock.now())
    db_session.commit()
    assert result.completed == []
    assert _channels(db_session, campaign_id)["email"].status == "planned"
    assert [(b.channel_id, b.first_id, b.last_id) for b in result.batches] == [
        (channel_id, *[r.id for r in _deliveries(db_session, channel_id)])
    ]


# -- reconciliation ----------------------------------------------------------------------


def _planned_campaign(db_session, user_id, contacts: int, *, status="running", now=T0):
    campaign_id = _campaign(db_session, user_id)
    _plan_all(db_session, campaign_id, now)
    if status != "running":
        db_session.execute(update(Campaign).where(Campaign.id == campaign_id).values(status=status))
        db_session.commit()
    channel_id = _channels(db_session, campaign_id)["email"].id
    return campaign_id, channel_id, [r.id for r in _deliveries(db_session, channel_id)]


def _set(db_session, ids, **values):
    db_session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(**values))
    db_session.commit()


def _covered(batches, channel_id) -> set[int]:
    ids: set[int] = set()
    for b in batches:
        if b.channel_id == channel_id:
            ids.update(range(b.first_id, b.last_id + 1))
    return ids


def test_reconcile_reclaims_expired_leases_and_rebatches_them(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 4)
    _, channel_id, ids = _planned_campaign(db_session, alice["id"], 4)
    now = T0 + timedelta(seconds=10)
    _set(db_session, ids[:2], status="sending", lease_expires_at=now - timedelta(seconds=1))
    _set(db_session, ids[2:3], status="sending", lease_expires_at=now + timedelta(seconds=30))

    result = reconcile(db_session, now)
    db_session.commit()

    assert result.leases_reclaimed == 2
    rows = {r.id: r for r in _deliveries(db_session, channel_id)}
    for reclaimed in ids[:2]:
        assert (rows[reclaimed].status, rows[reclaimed].lease_expires_at) == ("queued", None)
        assert rows[reclaimed].dispatched_at == now
    assert rows[ids[2]].status == "sending"  # its worker still holds a live lease
    assert rows[ids[3]].dispatched_at == T0  # its batch is recent: left alone
    assert set(ids[:2]) <= _covered(result.batches, channel_id)
    assert ids[2] not in {i for i in ids[:2]}
    # The next run finds nothing more to do.
    again = reconcile(db_session, now)
    assert (again.leases_reclaimed, again.batches) == (0, [])


def test_reconcile_batches_due_retries_only(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 3)
    _, channel_id, ids = _planned_campaign(db_session, alice["id"], 3)
    now = T0 + timedelta(seconds=20)
    _set(db_session, [ids[0]], next_attempt_at=now - timedelta(seconds=1), attempts=1)
    _set(db_session, [ids[1]], next_attempt_at=now + timedelta(seconds=30), attempts=1)

    result = reconcile(db_session, now)
    db_session.commit()

    assert [(b.first_id, b.last_id) for b in result.batches] == [(ids[0], ids[0])]
    rows = {r.id: r for r in _deliveries(db_session, channel_id)}
    assert rows[ids[0]].dispatched_at == now
    assert rows[ids[1]].dispatched_at == T0
    assert reconcile(db_session, now).batches == []  # dispatched since it came due
    # The other retry is batched when its time comes, before any dispatch goes stale.
    later = now + timedelta(seconds=31)
    assert [(b.first_id, b.last_id) for b in reconcile(db_session, later).batches] == [
        (ids[1], ids[1])
    ]


def test_reconcile_rebatches_dispatches_older_than_the_grace(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 250)
    _, channel_id, ids = _planned_campaign(db_session, alice["id"], 250)
    within = T0 + DISPATCH_GRACE
    assert reconcile(db_session, within).batches == []

    past = T0 + DISPATCH_GRACE + timedelta(seconds=1)
    result = reconcile(db_session, past, batch_size=100)
    db_session.commit()
    assert len(result.batches) == 3
    assert _covered(result.batches, channel_id) >= set(ids)
    assert {r.dispatched_at for r in _deliveries(db_session, channel_id)} == {past}
    assert reconcile(db_session, past).batches == []


def test_reconcile_leaves_stale_rows_alone_while_their_queue_is_busy(db_session, alice, clock):
    # A long backlog is not a lost one: while the channel's queue still holds tasks,
    # rows dispatched long ago may be waiting in it. Rows never dispatched (reclaimed,
    # handed back) are batched whatever the queue holds.
    insert_contacts(db_session, alice["id"], 3)
    _, channel_id, ids = _planned_campaign(db_session, alice["id"], 3)  # email channel
    _set(db_session, [ids[2]], dispatched_at=None)
    past = T0 + DISPATCH_GRACE * 2

    busy = reconcile(db_session, past, busy_channel_types={"email"})
    db_session.commit()
    assert [(b.first_id, b.last_id) for b in busy.batches] == [(ids[2], ids[2])]
    assert reconcile(db_session, past, busy_channel_types={"sms", "push"}).batches != []
    db_session.rollback()

    idle = reconcile(db_session, past, busy_channel_types=set())
    assert _covered(idle.batches, channel_id) >= set(ids[:2])


def test_reconcile_sweeps_are_bounded(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 250)
    ids = _planned_campaign(db_session, alice["id"], 250)[2]
    past = T0 + DISPATCH_GRACE * 2
    first = reconcile(db_session, past, batch_size=100, limit=150)
    db_session.commit()
    assert [(b.first_id, b.last_id) for b in first.batches] == [
        (ids[0], ids[99]),
        (ids[100], ids[149]),
    ]
    second = reconcile(db_session, past, batch_size=100, limit=150)
    assert [(b.first_id, b.last_id) for b in second.batches] == [(ids[150], ids[249])]


def test_reconcile_leaves_paused_campaigns_waiting(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 2)
    campaign_id, channel_id, ids = _planned_campaign(db_session, alice["id"], 2, status="paused")
    past = T0 + DISPATCH_GRACE * 2
    _set(db_session, [ids[0]], status="sending", lease_expires_at=past - timedelta(seconds=1))
    result = reconcile(db_session, past)
    db_session.commit()
    assert result.leases_reclaimed == 1  # back to queued...
    assert result.batches == []  # ...but nothing is sent while paused
    assert _campaign_row(db_session, campaign_id).status == "paused"
    # Resumed, both rows are dispatched again on the next run.
    db_session.execute(update(Campaign).where(Campaign.id == campaign_id).values(status="running"))
    db_session.commit()
    assert _covered(reconcile(db_session, past).batches, channel_id) >= set(ids)


def test_reconcile_cancels_what_a_cancelled_campaign_has_left(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 4)
    campaign_id, channel_id, ids = _planned_campaign(db_session, alice["id"], 4)
    now = T0 + timedelta(seconds=5)
    record_sent(db_session, [ids[0]], now)
    _set(db_session, [ids[1]], status="sending", lease_expires_at=now + timedelta(seconds=60))
    db_session.execute(
        update(Campaign).where(Campaign.id == campaign_id).values(status="cancelled")
    )
    db_session.commit()

    result = reconcile(db_session, now)
    db_session.commit()
    assert result.cancelled == 2
    assert result.batches == []
    statuses = {r.id: r.status for r in _deliveries(db_session, channel_id)}
    assert statuses == {ids[0]: "sent", ids[1]: "sending", ids[2]: "cancelled", ids[3]: "cancelled"}
    # A batch is still mid-send: the channel is not closed under it.
    assert _channels(db_session, campaign_id)["email"].status == "planned"

    # Its worker dies; once the lease runs out the row is reclaimed and cancelled too.
    expired = now + timedelta(seconds=61)
    result = reconcile(db_session, expired)
    db_session.commit()
    assert (result.leases_reclaimed, result.cancelled) == (1, 1)
    assert _channels(db_session, campaign_id)["email"].status == "done"
    assert _campaign_row(db_session, campaign_id).status == "cancelled"
    assert_counters_match(db_session)


def test_reconcile_plans_running_campaigns_left_unplanned(db_session, alice, clock):
    launched = _campaign(db_session, alice["id"], channels=("email", "sms"))
    half = _campaign(db_session, alice["id"], channels=("email", "sms"))
    plan_channel(db_session, _channels(db_session, half)["email"].id, clock.now())
    db_session.commit()
    planned = _campaign(db_session, alice["id"])
    _plan_all(db_session, planned, clock.now())
    _campaign(db_session, alice["id"], status="paused")
    _campaign(db_session, alice["id"], status="scheduled", scheduled_at=clock.now())

    result = reconcile(db_session, clock.now())
    assert sorted(result.campaigns_to_plan) == sorted([launched, half])


# -- the invariant helper ----------------------------------------------------------------


def test_counter_check_catches_a_counter_that_drifted(db_session, alice, clock):
    insert_contacts(db_session, alice["id"], 2)
    _, channel_id, ids = _planned_campaign(db_session, alice["id"], 2)
    record_sent(db_session, ids, clock.now())
    assert counter_mismatches(db_session) == []
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == channel_id)
        .values(sent_count=CampaignChannel.sent_count + 1)
    )
    db_session.commit()
    assert counter_mismatches(db_session) == [
        {"channel_id": channel_id, "counter": "sent_count", "stored": 3, "deliveries": 2}
    ]
    with pytest.raises(AssertionError):
        assert_counters_match(db_session)
    assert db_session.scalar(select(func.count()).select_from(Delivery)) == 2
