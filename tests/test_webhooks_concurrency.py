"""A thousand concurrent duplicate webhooks move a counter by exactly one.

The app runs in a real threaded HTTP server on loopback (werkzeug's, the one `flask
run` uses), and 1,000 client threads released together by a barrier each post one
signed callback over their own TCP connection, so the duplicates really race inside
PostgreSQL rather than queue in a test client.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections import Counter
from urllib.parse import urlencode

import pytest
from sqlalchemy import text
from werkzeug.serving import make_server

from engine.tracking.tokens import push_token
from tests.dispatch_helpers import assert_counters_match
from tests.tracking_helpers import (  # noqa: F401
    PUBLIC,
    WHATSAPP_SECRET,
    channel_counts,
    delivery,
    events_of,
    hook_app_fixture,
    hub_signature,
    sent_delivery,
    twilio_signature,
    webhook_settings,
    whatsapp_payload,
    whatsapp_status,
)

CONCURRENT = 1000
SID = "SM" + "c" * 32

pytestmark = pytest.mark.slow


@pytest.fixture
def server(hook_app):
    """The app on a loopback port, one thread per connection; yields the port."""
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # not a line per request, times a thousand
    httpd = make_server("127.0.0.1", 0, hook_app, threaded=True)
    # The default listen backlog (128) would make the kernel drop most of a burst of
    # 1,000 connections and the clients retry SYNs for a second or more.
    httpd.socket.listen(2048)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    thread.join(timeout=10)
    quiet.setLevel(level)


def burst(port: int, requests: list[tuple[str, bytes, dict[str, str]]]) -> tuple[list, float]:
    """Post every (path, body, headers) at once, one thread and connection each; the
    answers (status, JSON) and the seconds from release to the last answer."""
    barrier = threading.Barrier(len(requests) + 1)
    answers: list = [None] * len(requests)

    def post(index: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        barrier.wait()
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            answers[index] = (response.status, json.loads(response.read() or b"null"))
        except Exception as exc:  # recorded, so the assertion shows what went wrong
            answers[index] = ("error", repr(exc))
        finally:
            connection.close()

    threading.stack_size(256 * 1024)
    try:
        threads = [
            threading.Thread(target=post, args=(i, *request)) for i, request in enumerate(requests)
        ]
        for thread in threads:
            thread.start()
    finally:
        threading.stack_size(0)
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join(timeout=180)
    return answers, time.monotonic() - started


def tally(answers: list) -> Counter:
    total: Counter = Counter()
    for status, body in answers:
        assert status == 200, (status, body)
        total.update({k: v for k, v in body.items() if v})
    return total


def test_a_thousand_concurrent_duplicate_twilio_callbacks_count_once(
    server, db_session, alice, capsys
):
    sms = sent_delivery(db_session, alice["id"], "sms", provider_message_id=SID)
    form = {"MessageSid": SID, "MessageStatus": "delivered", "AccountSid": "AC" + "1" * 32}
    path = "/webhooks/twilio/status"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio_signature(PUBLIC + path, form),
    }
    body = urlencode(form).encode()

    answers, seconds = burst(server, [(path, body, headers)] * CONCURRENT)

    totals = tally(answers)
    assert totals == Counter(received=CONCURRENT, recorded=1, duplicates=CONCURRENT - 1)
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 1
    assert len(events_of(db_session, sms.delivery_id)) == 1
    assert_counters_match(db_session)
    with capsys.disabled():
        print(f"\n{CONCURRENT} concurrent duplicate Twilio callbacks: {seconds:.2f} s")


def test_a_thousand_concurrent_delivered_and_read_statuses_count_each_once(
    server, db_session, alice, capsys
):
    # Half say delivered, half say read (which implies delivered): whichever lands
    # first, delivered and opened each move by exactly one.
    wa = sent_delivery(db_session, alice["id"], "whatsapp", provider_message_id="wamid.X")
    requests = []
    for index in range(CONCURRENT):
        status = "delivered" if index % 2 else "read"
        body = json.dumps(
            whatsapp_payload([whatsapp_status("wamid.X", status, delivery_id=wa.delivery_id)])
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": hub_signature(body, WHATSAPP_SECRET),
        }
        requests.append(("/webhooks/whatsapp", body, headers))

    answers, seconds = burst(server, requests)

    totals = tally(answers)
    assert totals == Counter(received=CONCURRENT, recorded=2, duplicates=CONCURRENT - 2)
    counts = channel_counts(db_session, wa.channel_id)
    assert (counts["delivered"], counts["opened"]) == (1, 1)
    assert sorted(e.kind for e in events_of(db_session, wa.delivery_id)) == ["delivered", "opened"]
    assert_counters_match(db_session)
    with capsys.disabled():
        print(f"{CONCURRENT} concurrent WhatsApp delivered/read statuses: {seconds:.2f} s")


def test_a_thousand_concurrent_push_tokens_count_once(server, db_session, alice, settings):
    push = sent_delivery(db_session, alice["id"], "push")
    token = push_token(webhook_settings(settings), push.delivery_id)
    body = json.dumps({"token": token}).encode()
    headers = {"Content-Type": "application/json"}

    answers, _ = burst(server, [("/webhooks/push", body, headers)] * CONCURRENT)

    assert tally(answers) == Counter(received=CONCURRENT, recorded=1, duplicates=CONCURRENT - 1)
    assert channel_counts(db_session, push.channel_id)["delivered"] == 1
    assert delivery(db_session, push.delivery_id).delivered_at is not None
    assert_counters_match(db_session)


def test_a_deadlock_with_the_sender_is_run_again_not_answered_500(hook_app, db_session, alice):
    # The sender's recording transaction holds the channel row (it bumped sent_count) and
    # then wants a delivery row that a status callback has just locked, while the
    # callback waits for the channel row: PostgreSQL aborts one of them. When it is the
    # callback, the endpoint runs it again instead of answering 500.
    sms = sent_delivery(db_session, alice["id"], "sms", provider_message_id=SID)
    form = {"MessageSid": SID, "MessageStatus": "delivered"}
    path = "/webhooks/twilio/status"
    signature = twilio_signature(PUBLIC + path, form)
    sender = db_session.get_bind().engine.connect()
    transaction = sender.begin()
    sender.execute(
        text("UPDATE campaign_channels SET sent_count = sent_count WHERE id = :id"),
        {"id": sms.channel_id},
    )
    answer = {}

    def callback() -> None:
        answer["response"] = hook_app.test_client().post(
            path, data=form, headers={"X-Twilio-Signature": signature}
        )

    webhook = threading.Thread(target=callback)
    webhook.start()
    deadline = time.monotonic() + 20
    while not _waiting_on_a_lock(db_session, "delivery_events"):
        assert time.monotonic() < deadline, "the callback never waited for the channel row"
        time.sleep(0.02)
    blocked = threading.Thread(
        target=sender.execute,
        args=(
            text("UPDATE deliveries SET attempts = attempts WHERE id = :id"),
            {"id": sms.delivery_id},
        ),
    )
    blocked.start()
    blocked.join(timeout=30)  # returns once PostgreSQL broke the cycle
    assert not blocked.is_alive()
    transaction.commit()
    sender.close()
    webhook.join(timeout=30)

    response = answer["response"]
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["recorded"] == 1
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 1
    assert len(events_of(db_session, sms.delivery_id)) == 1
    assert_counters_match(db_session)


def _waiting_on_a_lock(db_session, query_fragment: str) -> bool:
    found = db_session.scalar(
        text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE :fragment"
        ),
        {"fragment": f"%{query_fragment}%"},
    )
    db_session.rollback()
    return bool(found)
